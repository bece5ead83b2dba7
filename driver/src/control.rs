//! The device control socket (contract 4 in docs/architecture.md): how enlightd's tuner,
//! `enlight tune` and tests read and change a running device's settings.
//!
//! A device process serves `<runtime dir>/control/<name>.sock` (directory 0700, socket 0600) with
//! a [`ControlServer`] over anything that implements [`Tunable`]. The protocol is one JSON object
//! per line each way; a connection stays open for more requests:
//!
//! - `{"op":"get"}` → `{"ok":true,"settings":{..},"limits":{..},"generation":N}`
//! - `{"op":"set","settings":{"poll_budget":32}}` (any subset of the knobs) →
//!   `{"ok":true,"settings":{..now..},"previous":{..before..},"generation":N}`
//! - errors: `{"ok":false,"error":{"kind":"malformed"|"out_of_range"|"unsupported"|"busy"|
//!   "internal","message":"..."}}`
//!
//! The server validates everything before the device sees it: a request is parsed by hand from a
//! bounded line ([`MAX_LINE`]), so a malformed or hostile client gets a typed error naming what
//! was wrong and cannot disturb the device's I/O. One change runs at a time (a second gets
//! `busy`); an applied change bumps `generation`, fires the `settings_change` USDT probe once per
//! changed knob, and calls the device's `on_change` hook (which rewrites its registry record).
//! A change runs to completion on the server's thread even if its client disconnects. Every
//! line gets exactly one reply (an empty one gets `malformed`); a connection that sends no
//! complete line for [`IDLE_TIMEOUT`] is closed, so idle clients cannot fill the
//! [`MAX_CONNECTIONS`] slots.

use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::ring::PAGE_SIZE;
use crate::settings::{DeviceSettings, Knob, SettingsLimits};
use crate::trace;

/// Longest request line the server reads (bytes, newline excluded); a longer one is answered
/// with `malformed` and the connection closed.
pub const MAX_LINE: usize = 64 * 1024;
/// Most connections served at once; more are answered with `busy` and closed.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a client waits for a response (a ring resize waits for in-flight I/O to drain).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(15);
/// A connection that completes no request line for this long is closed (after a `malformed`
/// reply if it had sent part of a line), so idle or stalled clients cannot hold the
/// [`MAX_CONNECTIONS`] slots and lock everyone else out. [`ControlClient`] reconnects on its
/// own when the server closed its idle connection.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often server threads look at the stop flag.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// `<runtime dir>/control`.
pub fn control_dir(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("control")
}

/// `<runtime dir>/control/<name>.sock`.
pub fn socket_path(runtime_dir: &Path, name: &str) -> PathBuf {
    control_dir(runtime_dir).join(format!("{name}.sock"))
}

/// A change to some knobs: `None` leaves a knob as it is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SettingsPatch {
    /// New outbound ring data area, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring_out_bytes: Option<u32>,
    /// New inbound ring data area, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring_in_bytes: Option<u32>,
    /// New moderation frame count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moderation_frames: Option<u32>,
    /// New moderation time, microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moderation_usecs: Option<u32>,
    /// New polling budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_budget: Option<u32>,
}

impl SettingsPatch {
    /// The value this patch gives `knob`, if any.
    pub fn get(&self, knob: Knob) -> Option<u32> {
        match knob {
            Knob::RingOutBytes => self.ring_out_bytes,
            Knob::RingInBytes => self.ring_in_bytes,
            Knob::ModerationFrames => self.moderation_frames,
            Knob::ModerationUsecs => self.moderation_usecs,
            Knob::PollBudget => self.poll_budget,
        }
    }

    /// Sets `knob` in the patch.
    pub fn set(&mut self, knob: Knob, value: u32) {
        let slot = match knob {
            Knob::RingOutBytes => &mut self.ring_out_bytes,
            Knob::RingInBytes => &mut self.ring_in_bytes,
            Knob::ModerationFrames => &mut self.moderation_frames,
            Knob::ModerationUsecs => &mut self.moderation_usecs,
            Knob::PollBudget => &mut self.poll_budget,
        };
        *slot = Some(value);
    }

    /// The patch that turns `from` into `to` (only the knobs that differ).
    pub fn between(from: &DeviceSettings, to: &DeviceSettings) -> SettingsPatch {
        let mut p = SettingsPatch::default();
        for (k, _, new) in from.diff(to) {
            p.set(k, new);
        }
        p
    }

    /// `base` with this patch applied.
    pub fn applied_to(&self, base: &DeviceSettings) -> DeviceSettings {
        let mut s = *base;
        for k in Knob::ALL {
            if let Some(v) = self.get(k) {
                k.set(&mut s, v);
            }
        }
        s
    }

    /// Whether the patch sets no knob.
    pub fn is_empty(&self) -> bool {
        Knob::ALL.into_iter().all(|k| self.get(k).is_none())
    }
}

/// The range of every knob a device accepts (inclusive `[min, max]`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Ring data area per direction, bytes.
    pub ring_bytes: [u32; 2],
    /// Ring sizes are multiples of this.
    pub ring_page: u32,
    /// Moderation frames.
    pub moderation_frames: [u32; 2],
    /// Moderation microseconds.
    pub moderation_usecs: [u32; 2],
    /// Polling budget.
    pub poll_budget: [u32; 2],
}

impl Limits {
    /// The limits of the synthetic devices ([`SettingsLimits`]).
    pub fn synthetic() -> Limits {
        Limits {
            ring_bytes: [SettingsLimits::RING_MIN, SettingsLimits::RING_MAX],
            ring_page: PAGE_SIZE as u32,
            moderation_frames: [
                *SettingsLimits::FRAMES.start(),
                *SettingsLimits::FRAMES.end(),
            ],
            moderation_usecs: [*SettingsLimits::USECS.start(), *SettingsLimits::USECS.end()],
            poll_budget: [
                *SettingsLimits::BUDGET.start(),
                *SettingsLimits::BUDGET.end(),
            ],
        }
    }

    /// `[min, max]` of `knob`.
    pub fn range(&self, knob: Knob) -> [u32; 2] {
        match knob {
            Knob::RingOutBytes | Knob::RingInBytes => self.ring_bytes,
            Knob::ModerationFrames => self.moderation_frames,
            Knob::ModerationUsecs => self.moderation_usecs,
            Knob::PollBudget => self.poll_budget,
        }
    }

    /// Checks one value; the error names the knob and its limits.
    pub fn check(&self, knob: Knob, value: u32) -> Result<(), ControlError> {
        let [min, max] = self.range(knob);
        let ring = matches!(knob, Knob::RingOutBytes | Knob::RingInBytes);
        let page_ok = !ring || self.ring_page == 0 || value.is_multiple_of(self.ring_page);
        if (min..=max).contains(&value) && page_ok {
            return Ok(());
        }
        let what = if ring {
            format!("a multiple of {} from {min} to {max}", self.ring_page)
        } else {
            format!("{min}..={max}")
        };
        Err(ControlError::OutOfRange(format!(
            "{} = {value} is outside its limits ({what})",
            knob.name()
        )))
    }

    /// Whether `value` is inside the limits of `knob`.
    pub fn allows(&self, knob: Knob, value: u32) -> bool {
        self.check(knob, value).is_ok()
    }

    /// The value inside the limits of `knob` closest to `value` (rings: rounded down to a page).
    pub fn clamp(&self, knob: Knob, value: u32) -> u32 {
        let [min, max] = self.range(knob);
        let v = value.clamp(min, max);
        if matches!(knob, Knob::RingOutBytes | Knob::RingInBytes) && self.ring_page > 0 {
            (v / self.ring_page * self.ring_page).max(min)
        } else {
            v
        }
    }
}

/// Errors of the control protocol: the first five are the error kinds of contract 4, sent over
/// the socket; the last two happen only on the client's side.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Not JSON, or not a known request; the message names the unknown key.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// A knob outside its limits; the message names the knob and its limits.
    #[error("out of range: {0}")]
    OutOfRange(String),
    /// The device lacks the knob.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// Another change is in progress.
    #[error("busy: {0}")]
    Busy(String),
    /// The device failed to apply the change (nothing changed unless the message says so).
    #[error("internal error: {0}")]
    Internal(String),
    /// Connecting to or talking with the socket failed.
    #[error("control socket {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// The device's answer does not follow the protocol.
    #[error("bad response from the device: {0}")]
    BadResponse(String),
}

impl ControlError {
    /// The `kind` string on the wire (`internal` for the client-side errors).
    pub fn kind(&self) -> &'static str {
        match self {
            ControlError::Malformed(_) => "malformed",
            ControlError::OutOfRange(_) => "out_of_range",
            ControlError::Unsupported(_) => "unsupported",
            ControlError::Busy(_) => "busy",
            ControlError::Internal(_) | ControlError::Io { .. } | ControlError::BadResponse(_) => {
                "internal"
            }
        }
    }

    fn message(&self) -> String {
        match self {
            ControlError::Malformed(m)
            | ControlError::OutOfRange(m)
            | ControlError::Unsupported(m)
            | ControlError::Busy(m)
            | ControlError::Internal(m)
            | ControlError::BadResponse(m) => m.clone(),
            ControlError::Io { .. } => self.to_string(),
        }
    }

    fn from_wire(kind: &str, message: String) -> ControlError {
        match kind {
            "malformed" => ControlError::Malformed(message),
            "out_of_range" => ControlError::OutOfRange(message),
            "unsupported" => ControlError::Unsupported(message),
            "busy" => ControlError::Busy(message),
            "internal" => ControlError::Internal(message),
            other => ControlError::BadResponse(format!("unknown error kind {other:?}: {message}")),
        }
    }

    fn to_wire(&self) -> Value {
        json!({"ok": false, "error": {"kind": self.kind(), "message": self.message()}})
    }
}

/// A device whose knobs can change while it runs. Implemented by every device that serves a
/// control socket (the synthetic disk today; NICs and emulated devices alike).
pub trait Tunable: Send + Sync {
    /// The settings in force.
    fn settings(&self) -> DeviceSettings;

    /// The device's limits.
    fn limits(&self) -> Limits;

    /// Whether the device has `knob` at all (a set naming a knob it lacks is `unsupported`).
    fn supports(&self, knob: Knob) -> bool {
        let _ = knob;
        true
    }

    /// Puts `target` in force and returns once it is. The server has checked `target` against
    /// [`limits`](Self::limits) and calls this for one change at a time, only when `target`
    /// differs from [`settings`](Self::settings). On error, the settings in force must be
    /// exactly as before (say otherwise in the message).
    fn apply(&self, target: &DeviceSettings) -> Result<(), ControlError>;
}

/// Called with the new settings after each applied change (e.g. to rewrite the registry record).
pub type OnChange = Box<dyn Fn(&DeviceSettings) + Send + Sync>;

/// The protocol logic, separate from the socket plumbing.
struct Core {
    device: Arc<dyn Tunable>,
    dev: u32,
    generation: AtomicU64,
    change: Mutex<()>,
    on_change: Option<OnChange>,
}

pub(crate) enum Request {
    Get,
    Set(SettingsPatch),
}

pub(crate) fn parse_request(line: &[u8]) -> Result<Request, ControlError> {
    let text = std::str::from_utf8(line)
        .map_err(|e| ControlError::Malformed(format!("request is not UTF-8 text: {e}")))?;
    let value: Value = serde_json::from_str(text)
        .map_err(|e| ControlError::Malformed(format!("request is not JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(ControlError::Malformed(
            "request must be a JSON object such as {\"op\":\"get\"}".into(),
        ));
    };
    let op = match obj.get("op") {
        Some(Value::String(op)) => op.as_str(),
        Some(other) => {
            return Err(ControlError::Malformed(format!(
                "\"op\" must be a string (\"get\" or \"set\"), got {other}"
            )))
        }
        None => {
            return Err(ControlError::Malformed(
                "request has no \"op\" (expected \"get\" or \"set\")".into(),
            ))
        }
    };
    let allowed: &[&str] = match op {
        "get" => &["op"],
        "set" => &["op", "settings"],
        other => {
            return Err(ControlError::Malformed(format!(
                "unknown op {other:?} (expected \"get\" or \"set\")"
            )))
        }
    };
    if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(ControlError::Malformed(format!(
            "unknown key {k:?} in a {op:?} request (allowed: {})",
            allowed.join(", ")
        )));
    }
    if op == "get" {
        return Ok(Request::Get);
    }
    let settings = match obj.get("settings") {
        Some(Value::Object(m)) => m,
        Some(other) => {
            return Err(ControlError::Malformed(format!(
                "\"settings\" must be an object of knobs, got {other}"
            )))
        }
        None => {
            return Err(ControlError::Malformed(
                "a \"set\" request needs \"settings\", e.g. {\"op\":\"set\",\"settings\":{\"poll_budget\":32}}"
                    .into(),
            ))
        }
    };
    parse_patch(settings).map(Request::Set)
}

fn parse_patch(m: &Map<String, Value>) -> Result<SettingsPatch, ControlError> {
    let mut patch = SettingsPatch::default();
    for (key, v) in m {
        let knob = Knob::from_name(key).ok_or_else(|| {
            ControlError::Malformed(format!(
                "unknown key {key:?} in settings (known: {})",
                Knob::ALL.map(Knob::name).join(", ")
            ))
        })?;
        let value = v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| {
                ControlError::Malformed(format!(
                    "settings.{key} must be an integer from 0 to {}, got {v}",
                    u32::MAX
                ))
            })?;
        patch.set(knob, value);
    }
    Ok(patch)
}

impl Core {
    fn handle(&self, line: &[u8]) -> Value {
        let result = parse_request(line).and_then(|req| match req {
            Request::Get => Ok(json!({
                "ok": true,
                "settings": self.device.settings(),
                "limits": self.device.limits(),
                "generation": self.generation.load(Ordering::SeqCst),
            })),
            Request::Set(patch) => self.set(&patch),
        });
        result.unwrap_or_else(|e| e.to_wire())
    }

    fn set(&self, patch: &SettingsPatch) -> Result<Value, ControlError> {
        // Check what can be checked before taking the change lock: a bad request never waits.
        let limits = self.device.limits();
        for k in Knob::ALL {
            if let Some(v) = patch.get(k) {
                if !self.device.supports(k) {
                    return Err(ControlError::Unsupported(format!(
                        "this device has no {} knob",
                        k.name()
                    )));
                }
                limits.check(k, v)?;
            }
        }
        let _guard = self.change.try_lock().map_err(|_| {
            ControlError::Busy("another change to this device is in progress; retry".into())
        })?;
        let previous = self.device.settings();
        let target = patch.applied_to(&previous);
        let changed = previous.diff(&target);
        if !changed.is_empty() {
            self.device.apply(&target)?;
            let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
            for (knob, old, new) in &changed {
                trace::settings_change(self.dev, *knob as u32, *old, *new);
            }
            if let Some(hook) = &self.on_change {
                hook(&self.device.settings());
            }
            log::info!(
                "device {}: settings generation {generation}: {}",
                self.dev,
                changed
                    .iter()
                    .map(|(k, o, n)| format!("{} {o} -> {n}", k.name()))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(json!({
            "ok": true,
            "settings": self.device.settings(),
            "previous": previous,
            "generation": self.generation.load(Ordering::SeqCst),
        }))
    }
}

/// Serves a device's control socket on its own threads until dropped (which removes the socket).
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    core: Arc<Core>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Serves `device` (whose USDT id is `dev`) at `path`: creates the parent directory with mode
    /// 0700 if needed, replaces a stale socket nobody listens on, binds with mode 0600. Fails if
    /// another live server already answers at `path`.
    pub fn start(
        path: &Path,
        device: Arc<dyn Tunable>,
        dev: u32,
        on_change: Option<OnChange>,
    ) -> Result<ControlServer, ControlError> {
        ControlServer::start_with_idle_timeout(path, device, dev, on_change, IDLE_TIMEOUT)
    }

    /// [`ControlServer::start`] with another idle timeout than [`IDLE_TIMEOUT`] (tests).
    pub fn start_with_idle_timeout(
        path: &Path,
        device: Arc<dyn Tunable>,
        dev: u32,
        on_change: Option<OnChange>,
        idle_timeout: Duration,
    ) -> Result<ControlServer, ControlError> {
        let io = |source| ControlError::Io {
            path: path.to_path_buf(),
            source,
        };
        let dir = path
            .parent()
            .ok_or_else(|| ControlError::Internal(format!("{} has no parent", path.display())))?;
        std::fs::create_dir_all(dir).map_err(io)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(io(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process already serves this control socket",
                )));
            }
            std::fs::remove_file(path).map_err(io)?;
        }
        // The directory is 0700, so nobody else can reach the socket in the moment before chmod.
        let listener = UnixListener::bind(path).map_err(io)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        listener.set_nonblocking(true).map_err(io)?;
        let stop = Arc::new(AtomicBool::new(false));
        let core = Arc::new(Core {
            device,
            dev,
            generation: AtomicU64::new(0),
            change: Mutex::new(()),
            on_change,
        });
        let thread = {
            let (stop, core) = (Arc::clone(&stop), Arc::clone(&core));
            std::thread::Builder::new()
                .name(format!("control-{dev}"))
                .spawn(move || accept_loop(listener, core, stop, idle_timeout))
                .map_err(io)?
        };
        Ok(ControlServer {
            path: path.to_path_buf(),
            stop,
            core,
            thread: Some(thread),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Changes applied so far.
    pub fn generation(&self) -> u64 {
        self.core.generation.load(Ordering::SeqCst)
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(
    listener: UnixListener,
    core: Arc<Core>,
    stop: Arc<AtomicBool>,
    idle_timeout: Duration,
) {
    let active = Arc::new(AtomicUsize::new(0));
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        conns.retain(|t| !t.is_finished());
        match listener.accept() {
            Ok((mut stream, _)) => {
                if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                    let e = ControlError::Busy(format!(
                        "{MAX_CONNECTIONS} connections already open; close one and retry"
                    ));
                    let _ = stream.set_nonblocking(false);
                    let _ = write_line(&mut stream, &e.to_wire());
                    continue;
                }
                active.fetch_add(1, Ordering::SeqCst);
                let (core, stop, active) =
                    (Arc::clone(&core), Arc::clone(&stop), Arc::clone(&active));
                let spawned = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || {
                        serve_connection(stream, &core, &stop, idle_timeout);
                        active.fetch_sub(1, Ordering::SeqCst);
                    });
                match spawned {
                    Ok(t) => conns.push(t),
                    Err(e) => log::warn!("control socket: no thread for a connection: {e}"),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut fds = [libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&listener),
                    events: libc::POLLIN,
                    revents: 0,
                }];
                // SAFETY: fds is one valid pollfd on the listener we own.
                unsafe { libc::poll(fds.as_mut_ptr(), 1, POLL_INTERVAL.as_millis() as i32) };
            }
            Err(e) => {
                log::warn!("control socket accept: {e}");
                std::thread::sleep(POLL_INTERVAL);
            }
        }
    }
    for t in conns {
        let _ = t.join();
    }
}

fn write_line(stream: &mut UnixStream, v: &Value) -> io::Result<()> {
    let mut body = serde_json::to_vec(v).expect("a JSON value always serialises");
    body.push(b'\n');
    stream.write_all(&body)
}

/// Reads requests line by line until the client closes, sends an over-long line, stays idle
/// (no complete line) for `idle_timeout`, or the server stops. Every line gets one reply; every
/// failure is confined to this connection.
fn serve_connection(
    mut stream: UnixStream,
    core: &Core,
    stop: &AtomicBool,
    idle_timeout: Duration,
) {
    if stream.set_nonblocking(false).is_err()
        || stream
            .set_read_timeout(Some(POLL_INTERVAL.min(idle_timeout)))
            .is_err()
        || stream.set_write_timeout(Some(CLIENT_TIMEOUT)).is_err()
    {
        return;
    }
    let mut buf: Vec<u8> = Vec::with_capacity(512);
    let mut chunk = [0u8; 4096];
    // The idle clock restarts at each complete line, not at each byte: a client trickling a
    // line byte by byte is as idle as a silent one.
    let mut last_line = Instant::now();
    loop {
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let line = line[..nl].strip_suffix(b"\r").unwrap_or(&line[..nl]);
            last_line = Instant::now();
            let response = if line.iter().all(u8::is_ascii_whitespace) {
                ControlError::Malformed(
                    "empty request line: send one JSON object per line, e.g. {\"op\":\"get\"}"
                        .into(),
                )
                .to_wire()
            } else {
                core.handle(line)
            };
            // The change (if any) is applied whatever happens to the client now.
            if write_line(&mut stream, &response).is_err() {
                return;
            }
        }
        if buf.len() > MAX_LINE {
            let e = ControlError::Malformed(format!(
                "request line longer than {MAX_LINE} bytes; closing the connection"
            ));
            let _ = write_line(&mut stream, &e.to_wire());
            return;
        }
        if stop.load(Ordering::SeqCst) {
            return;
        }
        if last_line.elapsed() >= idle_timeout {
            if !buf.is_empty() {
                let e = ControlError::Malformed(format!(
                    "no end of line within {} ms of the last request; closing the connection",
                    idle_timeout.as_millis()
                ));
                let _ = write_line(&mut stream, &e.to_wire());
            }
            return;
        }
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
        }
    }
}

mod client;

pub use client::{ControlClient, SetOutcome};

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Condvar;

    /// A device whose `apply` can be held until the test releases it, and which lacks
    /// `poll_budget` when asked to.
    struct FakeDevice {
        settings: Mutex<DeviceSettings>,
        hold: Mutex<bool>,
        released: Condvar,
        entered: AtomicUsize,
        applies: AtomicUsize,
        no_budget: bool,
    }

    impl FakeDevice {
        fn new(no_budget: bool) -> Arc<FakeDevice> {
            Arc::new(FakeDevice {
                settings: Mutex::new(DeviceSettings::default()),
                hold: Mutex::new(false),
                released: Condvar::new(),
                entered: AtomicUsize::new(0),
                applies: AtomicUsize::new(0),
                no_budget,
            })
        }

        fn set_hold(&self, hold: bool) {
            *self.hold.lock().unwrap() = hold;
            self.released.notify_all();
        }
    }

    impl Tunable for FakeDevice {
        fn settings(&self) -> DeviceSettings {
            *self.settings.lock().unwrap()
        }
        fn limits(&self) -> Limits {
            Limits::synthetic()
        }
        fn supports(&self, knob: Knob) -> bool {
            !(self.no_budget && knob == Knob::PollBudget)
        }
        fn apply(&self, target: &DeviceSettings) -> Result<(), ControlError> {
            self.entered.fetch_add(1, Ordering::SeqCst);
            let mut held = self.hold.lock().unwrap();
            while *held {
                held = self.released.wait(held).unwrap();
            }
            self.applies.fetch_add(1, Ordering::SeqCst);
            *self.settings.lock().unwrap() = *target;
            Ok(())
        }
    }

    struct Served {
        _dir: tempfile::TempDir,
        path: PathBuf,
        device: Arc<FakeDevice>,
        hooked: Arc<Mutex<Vec<DeviceSettings>>>,
        server: ControlServer,
    }

    fn serve(no_budget: bool) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path(), "dev0");
        let device = FakeDevice::new(no_budget);
        let hooked = Arc::new(Mutex::new(Vec::new()));
        let h = Arc::clone(&hooked);
        let server = ControlServer::start(
            &path,
            device.clone(),
            0,
            Some(Box::new(move |s: &DeviceSettings| {
                h.lock().unwrap().push(*s)
            })),
        )
        .unwrap();
        Served {
            _dir: dir,
            path,
            device,
            hooked,
            server,
        }
    }

    fn error_of(resp: &str) -> (String, String) {
        let v: Value = serde_json::from_str(resp).unwrap();
        assert_eq!(v["ok"], Value::Bool(false), "{resp}");
        (
            v["error"]["kind"].as_str().unwrap().to_string(),
            v["error"]["message"].as_str().unwrap().to_string(),
        )
    }

    #[test]
    fn get_set_and_partial_set() {
        let s = serve(false);
        let mut c = ControlClient::connect(&s.path).unwrap();
        let (settings, limits, generation) = c.get().unwrap();
        assert_eq!(settings, DeviceSettings::default());
        assert_eq!(limits, Limits::synthetic());
        assert_eq!(generation, 0);
        // A partial set changes only the knobs it names.
        let out = c
            .set_outcome(SettingsPatch {
                poll_budget: Some(16),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(out.previous, DeviceSettings::default());
        assert_eq!(
            out.settings,
            DeviceSettings {
                poll_budget: 16,
                ..Default::default()
            }
        );
        assert_eq!(out.generation, 1);
        // Setting the value in force changes nothing: no apply, same generation, no hook call.
        let same = c
            .set_outcome(SettingsPatch {
                poll_budget: Some(16),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(same.generation, 1);
        assert_eq!(s.device.applies.load(Ordering::SeqCst), 1);
        let all = DeviceSettings {
            ring_out_bytes: 8192,
            ring_in_bytes: 16384,
            moderation_frames: 3,
            moderation_usecs: 0,
            poll_budget: 4096,
        };
        let before = c.get().unwrap().0;
        let now = c.set(SettingsPatch::between(&before, &all)).unwrap();
        assert_eq!(now, all);
        assert_eq!(c.get().unwrap().2, 2);
        assert_eq!(s.server.generation(), 2);
        assert_eq!(s.hooked.lock().unwrap().last(), Some(&all));
        assert_eq!(s.hooked.lock().unwrap().len(), 2);
        // The raw wire form of contract 4.
        let raw = c.raw(br#"{"op":"get"}"#).unwrap();
        let v: Value = serde_json::from_str(&raw).unwrap();
        assert_eq!(v["ok"], true);
        assert_eq!(v["limits"]["ring_page"], 4096);
        assert_eq!(v["limits"]["poll_budget"], json!([1, 4096]));
        assert_eq!(v["settings"]["ring_in_bytes"], 16384);
    }

    #[test]
    fn every_error_kind_has_a_clear_message() {
        let s = serve(true);
        let mut c = ControlClient::connect(&s.path).unwrap();
        let cases: &[(&[u8], &str, &str)] = &[
            (b"not json", "malformed", "not JSON"),
            (b"\xff\xfe\x00garbage", "malformed", "not UTF-8"),
            (b"[1,2]", "malformed", "JSON object"),
            (b"{}", "malformed", "no \"op\""),
            (br#"{"op":"reboot"}"#, "malformed", "unknown op \"reboot\""),
            (br#"{"op":"get","verbose":true}"#, "malformed", "unknown key \"verbose\""),
            (br#"{"op":"set"}"#, "malformed", "needs \"settings\""),
            (br#"{"op":"set","settings":[]}"#, "malformed", "must be an object"),
            (
                br#"{"op":"set","settings":{"ring_size":8192}}"#,
                "malformed",
                "unknown key \"ring_size\" in settings",
            ),
            (
                br#"{"op":"set","settings":{"moderation_frames":-1}}"#,
                "malformed",
                "settings.moderation_frames must be an integer",
            ),
            (
                br#"{"op":"set","settings":{"moderation_frames":0}}"#,
                "out_of_range",
                "moderation_frames = 0 is outside its limits (1..=1024)",
            ),
            (
                br#"{"op":"set","settings":{"ring_out_bytes":5000}}"#,
                "out_of_range",
                "ring_out_bytes = 5000 is outside its limits (a multiple of 4096 from 8192 to 67108864)",
            ),
            (
                br#"{"op":"set","settings":{"poll_budget":8}}"#,
                "unsupported",
                "no poll_budget knob",
            ),
        ];
        for (req, kind, text) in cases {
            let resp = c.raw(req).unwrap();
            let (k, m) = error_of(&resp);
            assert_eq!(&k, kind, "{resp}");
            assert!(m.contains(text), "{:?}: {m}", String::from_utf8_lossy(req));
        }
        // A rejected set changed nothing, and the connection still works.
        assert_eq!(c.get().unwrap().0, DeviceSettings::default());
        assert_eq!(s.device.applies.load(Ordering::SeqCst), 0);
        // Client-side mapping of kinds to variants.
        let e = c
            .set(SettingsPatch {
                moderation_usecs: Some(1_000_000),
                ..Default::default()
            })
            .unwrap_err();
        assert!(matches!(e, ControlError::OutOfRange(ref m) if m.contains("moderation_usecs")));
        assert_eq!(e.kind(), "out_of_range");

        // busy: a second change while the first is held inside apply.
        s.device.set_hold(true);
        let path = s.path.clone();
        let first = std::thread::spawn(move || {
            ControlClient::connect(&path)
                .unwrap()
                .set(SettingsPatch {
                    moderation_frames: Some(2),
                    ..Default::default()
                })
                .unwrap()
        });
        // Wait until the first set is inside apply, holding the change lock.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while s.device.entered.load(Ordering::SeqCst) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the first set never reached apply"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let e = c
            .set(SettingsPatch {
                moderation_frames: Some(3),
                ..Default::default()
            })
            .unwrap_err();
        assert!(
            matches!(e, ControlError::Busy(ref m) if m.contains("in progress")),
            "{e}"
        );
        // A get is never blocked by a change in progress.
        assert_eq!(c.get().unwrap().0.moderation_frames, 8);
        s.device.set_hold(false);
        assert_eq!(first.join().unwrap().moderation_frames, 2);
    }

    #[test]
    fn oversized_line_is_refused_and_the_server_survives() {
        let s = serve(false);
        let mut hostile = UnixStream::connect(&s.path).unwrap();
        let big = vec![b'x'; MAX_LINE + 10_000];
        // The server may close before we finish writing: that is fine.
        let _ = hostile.write_all(&big);
        let mut resp = String::new();
        let _ = hostile.read_to_string(&mut resp);
        let (kind, msg) = error_of(resp.trim());
        assert_eq!(kind, "malformed");
        assert!(msg.contains("longer than 65536"), "{msg}");
        // Others are unaffected.
        let mut c = ControlClient::connect(&s.path).unwrap();
        assert_eq!(c.get().unwrap().2, 0);
    }

    #[test]
    fn client_disconnect_mid_request_still_applies_or_ignores_cleanly() {
        let s = serve(false);
        // Half a line, then gone: nothing is applied.
        {
            let mut a = UnixStream::connect(&s.path).unwrap();
            a.write_all(br#"{"op":"set","settings":{"poll_b"#).unwrap();
        }
        // A whole set, then gone before reading the answer: the change is applied in full.
        s.device.set_hold(true);
        {
            let mut b = UnixStream::connect(&s.path).unwrap();
            b.write_all(b"{\"op\":\"set\",\"settings\":{\"poll_budget\":9}}\n")
                .unwrap();
            std::thread::sleep(Duration::from_millis(150));
        }
        s.device.set_hold(false);
        let mut c = ControlClient::connect(&s.path).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while c.get().unwrap().2 == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the set was not applied within 30 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let (settings, _, generation) = c.get().unwrap();
        assert_eq!((settings.poll_budget, generation), (9, 1));
        assert_eq!(s.device.applies.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn socket_is_owner_only_and_removed_on_drop() {
        let s = serve(false);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&s.path), 0o600);
        assert_eq!(mode(s.path.parent().unwrap()), 0o700);
        // A second server on the same live socket is refused; a stale file is replaced.
        let again = ControlServer::start(&s.path, FakeDevice::new(false), 1, None);
        assert!(matches!(again, Err(ControlError::Io { .. })));
        let path = s.path.clone();
        drop(s.server);
        assert!(!path.exists());
        std::fs::write(&path, b"stale").unwrap();
        let _fresh = ControlServer::start(&path, FakeDevice::new(false), 1, None).unwrap();
        ControlClient::connect(&path).unwrap().get().unwrap();
    }

    #[test]
    fn patch_helpers_and_limits() {
        let l = Limits::synthetic();
        assert!(l.allows(Knob::RingOutBytes, 8192));
        assert!(!l.allows(Knob::RingOutBytes, 8193));
        assert_eq!(l.clamp(Knob::RingInBytes, 10_000), 8192);
        assert_eq!(l.clamp(Knob::PollBudget, 0), 1);
        let p = SettingsPatch {
            moderation_usecs: Some(5),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"moderation_usecs":5}"#
        );
        assert!(SettingsPatch::default().is_empty());
        assert!(serde_json::from_str::<SettingsPatch>(r#"{"bogus":1}"#).is_err());
    }

    /// Issue 12, item 11: a connection that sends no complete line for the idle timeout is
    /// closed, so sixteen idle clients no longer lock everyone else out, and the tuner's own
    /// long-lived client reconnects by itself.
    #[test]
    fn idle_connections_time_out_so_others_get_in() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path(), "idle0");
        let idle = Duration::from_millis(400);
        let _server =
            ControlServer::start_with_idle_timeout(&path, FakeDevice::new(false), 0, None, idle)
                .unwrap();
        let mut tuner = ControlClient::connect(&path).unwrap();
        tuner.get().unwrap();
        let mut idlers: Vec<UnixStream> = (0..MAX_CONNECTIONS - 2)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        // One more trickles a line byte by byte: as idle as the others.
        let mut trickler = UnixStream::connect(&path).unwrap();
        trickler
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        // Every slot is taken now: a newcomer is told so at once.
        std::thread::sleep(Duration::from_millis(100));
        let mut late = ControlClient::connect(&path).unwrap();
        assert!(matches!(late.get(), Err(ControlError::Busy(_))));
        for b in br#"{"op":"#.iter() {
            let _ = trickler.write_all(&[*b]);
            std::thread::sleep(Duration::from_millis(60));
        }
        // Past the idle timeout every idle connection is closed (the trickler is told why) and
        // a newcomer is served.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match ControlClient::connect(&path).and_then(|mut c| c.get()) {
                Ok((s, _, _)) => {
                    assert_eq!(s, DeviceSettings::default());
                    break;
                }
                Err(ControlError::Busy(_)) => {
                    assert!(Instant::now() < deadline, "still locked out");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("{e}"),
            }
        }
        let mut reply = String::new();
        let _ = trickler.read_to_string(&mut reply);
        let (kind, message) = error_of(reply.trim());
        assert_eq!(kind, "malformed");
        assert!(message.contains("no end of line"), "{message}");
        for s in &mut idlers {
            let mut rest = Vec::new();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            assert_eq!(
                s.read_to_end(&mut rest).unwrap(),
                0,
                "closed without a word"
            );
        }
        // The long-lived client finds its connection closed and opens a new one.
        assert_eq!(tuner.get().unwrap().0, DeviceSettings::default());
    }

    /// Issue 12, item 11: every line gets a reply, an empty one included.
    #[test]
    fn every_line_gets_a_reply_an_empty_one_too() {
        let s = serve(false);
        let mut c = UnixStream::connect(&s.path).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(b"\n   \r\n{\"op\":\"get\"}\n").unwrap();
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(c));
        for _ in 0..2 {
            let line = lines.next().unwrap().unwrap();
            let (kind, message) = error_of(&line);
            assert_eq!(kind, "malformed");
            assert!(message.contains("empty request line"), "{message}");
        }
        let v: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(v["ok"], Value::Bool(true), "{v}");
    }
}
