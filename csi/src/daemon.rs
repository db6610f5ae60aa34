//! A client of a running `virtiod run`'s control socket (`--control PATH`): one JSON request
//! per line, one JSON answer line each (`{"ok":true,"result":...}` or
//! `{"ok":false,"error":"..."}`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// How long one request may take: `add` creates a VDUSE device, `remove` flushes one.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a daemon request failed.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The socket could not be reached or the exchange broke off.
    #[error(
        "cannot talk to virtiod's control socket {path}: {source}; is `virtiod run --control {path}` running?"
    )]
    Unreachable {
        /// The control socket.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The daemon took longer than a minute.
    #[error("virtiod did not answer `{cmd}` within {CALL_TIMEOUT:?} on {path}")]
    TimedOut {
        /// The control socket.
        path: PathBuf,
        /// The request.
        cmd: String,
    },
    /// The answer was not the protocol's.
    #[error("unexpected answer from virtiod on {path}: {answer:?}")]
    BadAnswer {
        /// The control socket.
        path: PathBuf,
        /// The line received.
        answer: String,
    },
    /// The daemon refused the request.
    #[error("virtiod refused `{cmd}`: {message}")]
    Refused {
        /// The request.
        cmd: String,
        /// The daemon's one-line reason.
        message: String,
    },
}

/// One device as `list` reports it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct DeviceEntry {
    /// The device name.
    pub name: String,
    /// `vduse` or `vhost-user`.
    pub transport: String,
    /// The socket path or device node.
    #[serde(default)]
    pub endpoint: String,
    /// The image it serves.
    #[serde(default)]
    pub image: String,
    /// Whether it is serving.
    #[serde(default)]
    pub up: bool,
    /// Why it is not up.
    #[serde(default)]
    pub error: Option<String>,
}

/// The answer to `resize`.
#[derive(Debug, Clone, Deserialize)]
pub struct Resized {
    /// The size before, bytes.
    pub old: u64,
    /// The size now, bytes.
    pub capacity: u64,
    /// Whether the driver was told.
    pub notified: bool,
}

/// The daemon's control socket.
#[derive(Debug, Clone)]
pub struct Daemon {
    path: PathBuf,
}

impl Daemon {
    /// A client of the control socket at `path` (nothing is connected yet).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The control socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The devices the daemon serves.
    pub async fn list(&self) -> Result<Vec<DeviceEntry>, DaemonError> {
        let value = self.call(json!({ "cmd": "list" })).await?;
        serde_json::from_value(value.clone()).map_err(|_| DaemonError::BadAnswer {
            path: self.path.clone(),
            answer: value.to_string(),
        })
    }

    /// Add a device described as in devices.toml (`[[device]]` TOML or JSON); answers its
    /// endpoint.
    pub async fn add(&self, device: &str) -> Result<String, DaemonError> {
        let value = self.call(json!({ "cmd": "add", "device": device })).await?;
        Ok(value["endpoint"].as_str().unwrap_or_default().to_string())
    }

    /// Stop and forget a device.
    pub async fn remove(&self, name: &str) -> Result<(), DaemonError> {
        self.call(json!({ "cmd": "remove", "name": name }))
            .await
            .map(|_| ())
    }

    /// Grow a device to `size` bytes and tell its driver.
    pub async fn resize(&self, name: &str, size: u64) -> Result<Resized, DaemonError> {
        let value = self
            .call(json!({ "cmd": "resize", "name": name, "size": size }))
            .await?;
        serde_json::from_value(value.clone()).map_err(|_| DaemonError::BadAnswer {
            path: self.path.clone(),
            answer: value.to_string(),
        })
    }

    /// Send one request, read its answer line.
    async fn call(&self, request: Value) -> Result<Value, DaemonError> {
        let cmd = request["cmd"].as_str().unwrap_or_default().to_string();
        match tokio::time::timeout(CALL_TIMEOUT, self.exchange(&request)).await {
            Err(_) => Err(DaemonError::TimedOut {
                path: self.path.clone(),
                cmd,
            }),
            Ok(Err(source)) => Err(DaemonError::Unreachable {
                path: self.path.clone(),
                source,
            }),
            Ok(Ok(answer)) => self.parse(cmd, answer),
        }
    }

    async fn exchange(&self, request: &Value) -> std::io::Result<String> {
        let mut stream = UnixStream::connect(&self.path).await?;
        let mut line = request.to_string();
        line.push('\n');
        stream.write_all(line.as_bytes()).await?;
        let mut answer = String::new();
        BufReader::new(stream).read_line(&mut answer).await?;
        if answer.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the daemon closed the connection without answering",
            ));
        }
        Ok(answer)
    }

    fn parse(&self, cmd: String, answer: String) -> Result<Value, DaemonError> {
        let bad = || DaemonError::BadAnswer {
            path: self.path.clone(),
            answer: answer.trim().to_string(),
        };
        let value: Value = serde_json::from_str(&answer).map_err(|_| bad())?;
        match value["ok"].as_bool() {
            Some(true) => Ok(value.get("result").cloned().unwrap_or(Value::Null)),
            Some(false) => Err(DaemonError::Refused {
                cmd,
                message: value["error"].as_str().unwrap_or("failed").to_string(),
            }),
            None => Err(bad()),
        }
    }
}
