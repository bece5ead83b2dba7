//! The client side of the control socket: what enlightd's tuner, `enlight tune` and the tests
//! use to read and change a running device's settings.

use super::*;

/// The answer to a `set`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct SetOutcome {
    /// The settings now in force.
    pub settings: DeviceSettings,
    /// The settings before.
    pub previous: DeviceSettings,
    /// Changes applied to the device so far.
    pub generation: u64,
}

/// A connection to a device's control socket.
pub struct ControlClient {
    path: PathBuf,
    stream: UnixStream,
    buf: Vec<u8>,
}

impl ControlClient {
    /// Connects to the socket at `path` (e.g. `DeviceRecord::control`).
    pub fn connect(path: &Path) -> Result<ControlClient, ControlError> {
        let io = |source| ControlError::Io {
            path: path.to_path_buf(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(io)?;
        stream.set_read_timeout(Some(CLIENT_TIMEOUT)).map_err(io)?;
        stream.set_write_timeout(Some(CLIENT_TIMEOUT)).map_err(io)?;
        Ok(ControlClient {
            path: path.to_path_buf(),
            stream,
            buf: Vec::new(),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The settings in force, the device's limits and its generation.
    pub fn get(&mut self) -> Result<(DeviceSettings, Limits, u64), ControlError> {
        let v = self.request(&json!({"op": "get"}))?;
        let field = |name: &str| {
            v.get(name)
                .cloned()
                .ok_or_else(|| ControlError::BadResponse(format!("no {name:?} in {v}")))
        };
        let settings = serde_json::from_value(field("settings")?)
            .map_err(|e| ControlError::BadResponse(format!("settings: {e}")))?;
        let limits = serde_json::from_value(field("limits")?)
            .map_err(|e| ControlError::BadResponse(format!("limits: {e}")))?;
        let generation = field("generation")?
            .as_u64()
            .ok_or_else(|| ControlError::BadResponse("generation is not a number".into()))?;
        Ok((settings, limits, generation))
    }

    /// Applies `patch` and returns the settings now in force.
    pub fn set(&mut self, patch: SettingsPatch) -> Result<DeviceSettings, ControlError> {
        self.set_outcome(patch).map(|o| o.settings)
    }

    /// Applies `patch` and returns the settings now and before, and the generation.
    pub fn set_outcome(&mut self, patch: SettingsPatch) -> Result<SetOutcome, ControlError> {
        let v = self.request(&json!({"op": "set", "settings": patch}))?;
        serde_json::from_value(v).map_err(|e| ControlError::BadResponse(e.to_string()))
    }

    /// Whether the server has closed this connection (its idle timeout): nothing to read but
    /// the end of the stream. A reply never arrives unasked, so anything else means open.
    fn closed_by_server(&self) -> bool {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.stream);
        let mut fds = [libc::pollfd {
            fd,
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        }];
        // SAFETY: one valid pollfd on the socket we own, no waiting.
        if unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) } <= 0 {
            return false;
        }
        let mut byte = 0u8;
        // SAFETY: a one-byte peek into a local; MSG_DONTWAIT never blocks.
        let n = unsafe {
            libc::recv(
                fd,
                (&mut byte as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n == 0 || (n < 0 && fds[0].revents & (libc::POLLHUP | libc::POLLERR) != 0)
    }

    /// Sends one raw line (no newline) and returns the raw response line: for tests and tools.
    /// A connection the server closed while idle is opened again first (the request had not
    /// been sent, so nothing is sent twice).
    pub fn raw(&mut self, line: &[u8]) -> Result<String, ControlError> {
        if self.buf.is_empty() && self.closed_by_server() {
            let path = self.path.clone();
            *self = ControlClient::connect(&path)?;
        }
        let mut body = line.to_vec();
        body.push(b'\n');
        if let Err(e) = self.stream.write_all(&body) {
            // A server that refused the connection (`busy`: every slot taken) wrote why and
            // closed before our request went out: its reason is the answer.
            if matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ) {
                if let Ok(reply) = self.read_line() {
                    return Ok(reply);
                }
            }
            return Err(ControlError::Io {
                path: self.path.clone(),
                source: e,
            });
        }
        self.read_line()
    }

    fn read_line(&mut self) -> Result<String, ControlError> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                return String::from_utf8(line[..nl].to_vec())
                    .map_err(|e| ControlError::BadResponse(e.to_string()));
            }
            if self.buf.len() > MAX_LINE {
                return Err(ControlError::BadResponse("response line too long".into()));
            }
            let n = self
                .stream
                .read(&mut chunk)
                .map_err(|source| ControlError::Io {
                    path: self.path.clone(),
                    source,
                })?;
            if n == 0 {
                return Err(ControlError::Io {
                    path: self.path.clone(),
                    source: io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the device closed the connection",
                    ),
                });
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn request(&mut self, req: &Value) -> Result<Value, ControlError> {
        let line = serde_json::to_vec(req).expect("a JSON value always serialises");
        let resp = self.raw(&line)?;
        let v: Value = serde_json::from_str(&resp)
            .map_err(|e| ControlError::BadResponse(format!("{e}: {resp}")))?;
        match v.get("ok") {
            Some(Value::Bool(true)) => Ok(v),
            Some(Value::Bool(false)) => {
                let kind = v
                    .pointer("/error/kind")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let message = v
                    .pointer("/error/message")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                Err(ControlError::from_wire(kind, message))
            }
            _ => Err(ControlError::BadResponse(format!("no \"ok\" in {resp}"))),
        }
    }
}
