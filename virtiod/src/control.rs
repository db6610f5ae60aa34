//! `--control PATH`: a unix socket taking one JSON request per line and answering one JSON
//! line each, and `virtiod ctl`, its client.
//!
//! ```text
//! {"cmd":"list"}                              -> {"ok":true,"result":[{"name":"a",...}]}
//! {"cmd":"add","device":"<TOML or JSON>"}     -> {"ok":true,"result":{"endpoint":"/run/a.sock"}}
//! {"cmd":"remove","name":"a"}                 -> {"ok":true,"result":null}
//! {"cmd":"stats"} / {"cmd":"stats","name":"a"} -> {"ok":true,"result":[{"name":"a","requests":{...},...}]}
//! {"cmd":"qos","name":"a"}                    -> {"ok":true,"result":{"iops":2000}}  (the limits)
//! {"cmd":"qos","name":"a","set":{"iops":4000,"read-bps":"100M"}}  -> the new limits ({} lifts all)
//! {"cmd":"resize","name":"a","size":2147483648} -> {"ok":true,"result":{"old":..,"capacity":..,"notified":true}}
//! {"cmd":"upgrade"} / {"cmd":"upgrade","binary":"/opt/v2/virtiod","timeout":60}
//!                                             -> {"ok":true,"result":{"old_pid":..,"new_pid":..}}
//! anything wrong                              -> {"ok":false,"error":"one line: what to do"}
//! ```
//!
//! Limits ([`LIMITS`], served by [`crate::door`]): a request line of at most 64 KiB, 64
//! connections, 30 s to send a complete request. A longer line, a quiet connection and the
//! quietest connection when a 65th client arrives each get one `{"ok":false,...}` line and are
//! closed. The socket file is mode 0600.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cli::{CtlArgs, CtlCommand};
use crate::door::{Framing, Limits, Notice, Reply};
use crate::registry::Registry;
use crate::usage::Usage;

/// The control socket's bounds. Four workers: `add` and `remove` can take seconds (a VDUSE
/// device is created, a removed device flushes) and `list` must not wait behind them.
pub const LIMITS: Limits = Limits {
    max_request: 64 * 1024,
    max_clients: 64,
    idle_timeout: Duration::from_secs(30),
    workers: 4,
};

/// A request line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    List,
    Add {
        device: String,
    },
    Remove {
        name: String,
    },
    Stats {
        name: Option<String>,
    },
    Resize {
        name: String,
        /// Bytes.
        size: u64,
        #[serde(default)]
        shrink: bool,
    },
    Qos {
        name: String,
        /// Replace every limit with these (devices.toml's names); absent: only show them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        set: Option<serde_json::Map<String, Value>>,
    },
    /// Hand every device over to a new process (see `crate::upgrade`).
    Upgrade {
        /// The new binary (default: the one the daemon was started from).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        binary: Option<PathBuf>,
        /// Seconds the new process has to confirm.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout: Option<u64>,
    },
}

/// An answer line.
#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The control socket: removed when the daemon ends.
pub struct ControlSocket {
    path: PathBuf,
    /// A copy of the listener (the door serves the other), to hand over on an upgrade.
    listener: UnixListener,
}

impl ControlSocket {
    /// The listening socket.
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listen on `path` (a stale socket is replaced, a live one or another file refused), make it
/// mode 0600, and answer requests within [`LIMITS`].
pub fn start(path: &Path, registry: Arc<Registry>) -> anyhow::Result<ControlSocket> {
    let listener: UnixListener = virtiod_vhost_user::bind_socket(path).context("control socket")?;
    let socket = ControlSocket {
        path: path.to_path_buf(),
        listener: listener.try_clone().context("control socket")?,
    };
    crate::confine::secure_control_socket(path)?;
    crate::door::spawn("control", listener, ControlProtocol(registry), LIMITS)
        .context("cannot start the control thread")?;
    tracing::info!(path = %path.display(), "control socket listening");
    Ok(socket)
}

/// Answer requests on the control socket at `path` that the process this one replaced
/// listened on (`virtiod upgrade`).
pub fn start_on(
    path: &Path,
    listener: UnixListener,
    registry: Arc<Registry>,
) -> anyhow::Result<ControlSocket> {
    let socket = ControlSocket {
        path: path.to_path_buf(),
        listener: listener.try_clone().context("control socket")?,
    };
    crate::door::spawn("control", listener, ControlProtocol(registry), LIMITS)
        .context("cannot start the control thread")?;
    tracing::info!(path = %path.display(), "control socket taken over");
    Ok(socket)
}

/// One JSON request per line, one JSON answer line each.
struct ControlProtocol(Arc<Registry>);

impl crate::door::Protocol for ControlProtocol {
    fn frame(&self, buf: &[u8], max: usize) -> Framing {
        crate::door::frame_line(buf, max)
    }

    fn handle(&self, request: &[u8]) -> Reply {
        let line = String::from_utf8_lossy(request);
        if line.trim().is_empty() {
            return Reply {
                bytes: Vec::new(),
                close: false,
            };
        }
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(req) => handle(req, &self.0),
            Err(e) => failure(format!(
                "bad request ({e}): send one JSON object per line, e.g. {{\"cmd\":\"list\"}}"
            )),
        };
        Reply {
            bytes: answer_line(&response),
            close: false,
        }
    }

    fn notice(&self, notice: Notice, limits: &Limits) -> Vec<u8> {
        let error = match notice {
            Notice::TooLong => format!(
                "request longer than {} KiB: closed; send one JSON object per line",
                limits.max_request / 1024
            ),
            Notice::TimedOut => format!(
                "no complete request in {} s: closed",
                limits.idle_timeout.as_secs()
            ),
            Notice::Evicted => format!(
                "{} control clients connected: this one, the quietest, was closed to make room",
                limits.max_clients
            ),
            Notice::Busy => format!(
                "{} control clients have requests in progress: try again",
                limits.max_clients
            ),
        };
        tracing::debug!(?notice, "control connection closed");
        answer_line(&failure(error))
    }
}

fn answer_line(response: &Response) -> Vec<u8> {
    let mut text = serde_json::to_string(response).unwrap_or_default();
    text.push('\n');
    text.into_bytes()
}

fn failure(error: String) -> Response {
    Response {
        ok: false,
        result: None,
        error: Some(error.replace('\n', " ")),
    }
}

fn success(result: Value) -> Response {
    Response {
        ok: true,
        result: Some(result),
        error: None,
    }
}

fn handle(req: Request, registry: &Registry) -> Response {
    let result = match req {
        Request::List => serde_json::to_value(registry.list()).map_err(anyhow::Error::from),
        Request::Add { device } => virtiod_config::parse_device(&device)
            .map_err(|e| anyhow::anyhow!("device: {e}"))
            .and_then(|spec| {
                crate::confine::check_added(&spec)?;
                let name = spec.name.clone();
                tracing::info!(device = %name, "control: add");
                let endpoint = registry.add(spec)?;
                // Recorded, so that a restarted daemon serves it again (crate::persist).
                if registry.records() {
                    if let Err(e) = crate::persist::record(registry.state_dir(), &name, &device) {
                        let _ = registry.remove(&name);
                        return Err(e);
                    }
                }
                Ok(endpoint)
            })
            .map(|endpoint| serde_json::json!({ "endpoint": endpoint })),
        Request::Remove { name } => {
            tracing::info!(device = ?name, "control: remove");
            registry
                .remove(&name)
                .and_then(|()| match registry.records() {
                    true => crate::persist::forget(registry.state_dir(), &name),
                    false => Ok(()),
                })
                .map(|()| Value::Null)
        }
        Request::Stats { name } => registry
            .stats(name.as_deref())
            .and_then(|s| serde_json::to_value(s).map_err(anyhow::Error::from)),
        Request::Qos { name, set } => qos_request(registry, &name, set.as_ref()),
        Request::Upgrade { binary, timeout } => upgrade_request(registry, binary, timeout),
        Request::Resize { name, size, shrink } => {
            tracing::info!(device = %name, size, shrink, "control: resize");
            registry.resize(&name, size, shrink).map(|r| {
                serde_json::json!({
                    "old": r.old,
                    "capacity": r.new,
                    "notified": r.notified.is_ok(),
                    "note": r.notified.err(),
                })
            })
        }
    };
    match result {
        Ok(v) => success(v),
        Err(e) => failure(format!("{e:#}")),
    }
}

/// `qos`: parse the new limits (if any), apply them, answer the limits in effect.
fn qos_request(
    registry: &Registry,
    name: &str,
    set: Option<&serde_json::Map<String, Value>>,
) -> anyhow::Result<Value> {
    let limits = match set {
        None => None,
        Some(map) => {
            let pairs = map.iter().map(|(k, v)| {
                let text = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.as_str(), text)
            });
            Some(virtiod_config::qos_from_pairs(pairs).map_err(|e| anyhow::anyhow!("qos: {e}"))?)
        }
    };
    let now = registry.qos(name, limits)?;
    let map: serde_json::Map<String, Value> = virtiod_config::qos_pairs(&now)
        .into_iter()
        .map(|(k, v)| (k.to_string(), Value::from(v)))
        .collect();
    Ok(Value::Object(map))
}

/// `upgrade`: wake the main loop (the new process is started from the main thread, never
/// from a confined one) and wait for the outcome.
fn upgrade_request(
    registry: &Registry,
    binary: Option<PathBuf>,
    timeout: Option<u64>,
) -> anyhow::Result<Value> {
    let timeout = timeout.map_or(crate::upgrade::DEFAULT_TIMEOUT, Duration::from_secs);
    // Refused at once while one runs (or this process has just handed over and is exiting).
    registry.refuse_while_upgrading()?;
    tracing::info!(binary = ?binary, timeout_s = timeout.as_secs(), "control: upgrade");
    let (tx, rx) = std::sync::mpsc::channel();
    let req = crate::upgrade::Request {
        binary,
        timeout,
        reply: Some(tx),
    };
    registry
        .events()
        .send(crate::device::Event::Upgrade(req))
        .map_err(|_| anyhow::anyhow!("the daemon is stopping"))?;
    let outcome = rx
        .recv_timeout(timeout + Duration::from_secs(10))
        .map_err(|_| anyhow::anyhow!("no outcome from the upgrade: see the daemon's log"))?;
    let pid = outcome.map_err(anyhow::Error::msg)?;
    Ok(serde_json::json!({ "old_pid": std::process::id(), "new_pid": pid }))
}

/// Send one request and read its answer.
pub fn call(path: &Path, req: &Request) -> anyhow::Result<Value> {
    let mut stream = UnixStream::connect(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            return anyhow::anyhow!(
                "cannot reach the daemon's control socket {}: permission denied: it admits root, the daemon's user and the members of its group (ls -l {} shows which): ask to be added to that group, or use the daemon's user",
                path.display(),
                path.display()
            );
        }
        anyhow::Error::from(e).context(format!(
            "cannot reach the daemon's control socket {}: is virtiod running with --control {}?",
            path.display(),
            path.display()
        ))
    })?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    // A daemon that refuses this user answers one line and closes without reading: read the
    // answer even when the request could not be written.
    let sent = stream.write_all(line.as_bytes());
    let mut answer = String::new();
    let _ = BufReader::new(&stream).read_line(&mut answer);
    if answer.is_empty() {
        sent?;
        anyhow::bail!("the daemon closed the control connection without answering");
    }
    let response: Response = serde_json::from_str(&answer)
        .with_context(|| format!("unexpected answer from the daemon: {answer:?}"))?;
    match response {
        Response {
            ok: true, result, ..
        } => Ok(result.unwrap_or(Value::Null)),
        Response { error, .. } => anyhow::bail!(error.unwrap_or_else(|| "failed".into())),
    }
}

/// `virtiod ctl`.
pub fn ctl(args: CtlArgs) -> anyhow::Result<()> {
    let req = match args.command {
        CtlCommand::List => Request::List,
        CtlCommand::Add { device } => {
            // A file path, or the text itself.
            let text = match std::fs::read_to_string(&device) {
                Ok(text) => text,
                Err(_) => device,
            };
            // Check it here too, so mistakes show their line and column before any round trip.
            virtiod_config::parse_device(&text).map_err(|e| Usage(format!("device: {e}")))?;
            Request::Add { device: text }
        }
        CtlCommand::Remove { name } => Request::Remove { name },
        CtlCommand::Upgrade { binary, timeout } => Request::Upgrade {
            binary: binary.map(|b| std::path::absolute(&b).unwrap_or(b)),
            timeout,
        },
        CtlCommand::Stats { name } => Request::Stats { name },
        CtlCommand::Resize { name, size, shrink } => {
            let size = virtiod_backend::parse_size(&size).map_err(Usage)?;
            Request::Resize { name, size, shrink }
        }
        CtlCommand::Qos {
            name,
            clear,
            limits,
        } => {
            let pairs = limits.pairs();
            // Check here too: a mistake is shown before any round trip.
            virtiod_config::qos_from_pairs(pairs.clone()).map_err(Usage)?;
            let set = (clear || !pairs.is_empty()).then(|| {
                pairs
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), Value::String(v)))
                    .collect()
            });
            Request::Qos { name, set }
        }
    };
    let kind = match &req {
        Request::List => "list",
        Request::Add { .. } => "add",
        Request::Remove { .. } => "remove",
        Request::Stats { .. } => "stats",
        Request::Qos { .. } => "qos",
        Request::Resize { .. } => "resize",
        Request::Upgrade { .. } => "upgrade",
    };
    let result = call(&args.control, &req)?;
    if let (Request::Upgrade { .. }, Some(old)) = (&req, result["old_pid"].as_u64()) {
        // Return once the old process is gone: every later command reaches the new one.
        let proc = PathBuf::from(format!("/proc/{old}"));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while proc.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
        return Ok(());
    }
    match kind {
        "list" => print_list(&result),
        "stats" => print_stats(&result),
        "add" => println!("{}", result["endpoint"].as_str().unwrap_or("")),
        "upgrade" => println!(
            "upgraded: pid {} -> {}",
            result["old_pid"], result["new_pid"]
        ),
        "qos" => print_qos(&result),
        "resize" => match result["note"].as_str() {
            None => println!(
                "{} -> {} bytes; driver notified",
                result["old"], result["capacity"]
            ),
            Some(note) => println!(
                "{} -> {} bytes; driver NOT notified: {note}",
                result["old"], result["capacity"]
            ),
        },
        _ => {}
    }
    Ok(())
}

fn print_list(result: &Value) {
    for d in result.as_array().into_iter().flatten() {
        let up = if d["up"].as_bool() == Some(true) {
            "up"
        } else {
            "DOWN"
        };
        let s = |k: &str| d[k].as_str().unwrap_or("").to_string();
        let mut line = if d["kind"].as_str() == Some("net") {
            format!(
                "{} {} {} {up} net={} mac={}",
                s("name"),
                s("transport"),
                s("endpoint"),
                s("image"),
                s("mac")
            )
        } else {
            format!(
                "{} {} {} {up} queues={} image={}",
                s("name"),
                s("transport"),
                s("endpoint"),
                d["queues"],
                s("image")
            )
        };
        if let Some(err) = d["error"].as_str() {
            line.push_str(&format!(" error={err:?}"));
        }
        println!("{}", line.split_whitespace().collect::<Vec<_>>().join(" "));
    }
}

/// `name=value ...` in devices.toml's names, or `none`.
fn print_qos(result: &Value) {
    let pairs: Vec<String> = result
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if pairs.is_empty() {
        println!("none");
    } else {
        println!("{}", pairs.join(" "));
    }
}

fn print_stats(result: &Value) {
    for d in result.as_array().into_iter().flatten() {
        let name = d["name"].as_str().unwrap_or("");
        if d["kind"].as_str() == Some("net") {
            print_net_stats(name, d);
            continue;
        }
        let ops = ["read", "write", "flush", "discard", "write_zeroes", "other"];
        let counts: Vec<String> = ops
            .iter()
            .map(|op| format!("{op}={}/{}B", d["requests"][op], d["bytes"][op]))
            .collect();
        println!(
            "{name} {} errors={} in_flight={} throttled={}/{:.3}s",
            counts.join(" "),
            d["errors"],
            d["in_flight"],
            d["throttled_requests"],
            d["throttled_seconds"].as_f64().unwrap_or(0.0)
        );
    }
}

/// `NAME rx=PACKETS/BYTESB tx=PACKETS/BYTESB rx_drop_REASON=N … tx_drop_REASON=N`.
fn print_net_stats(name: &str, d: &Value) {
    let mut line = format!(
        "{name} rx={}/{}B tx={}/{}B",
        d["rx_packets"], d["rx_bytes"], d["tx_packets"], d["tx_bytes"]
    );
    for direction in ["rx", "tx"] {
        let reasons = d["drops"][direction].as_object().into_iter().flatten();
        for (reason, n) in reasons {
            line.push_str(&format!(" {direction}_drop_{reason}={n}"));
        }
    }
    println!("{line}");
}
