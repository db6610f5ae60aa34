//! `virtiod ctl upgrade` (or SIGUSR2): replace the running daemon by a new binary without
//! re-creating a device.
//!
//! The old process starts the new binary with its own arguments and a hidden
//! `--takeover-fd N` (one end of a `SOCK_SEQPACKET` pair, [`wire`]), from the main thread
//! (never a confined one). Then:
//!
//! 1. old → new `Hello`: every device's description (including `ctl add`ed ones and changed
//!    QoS limits). The new process opens every image and backend (the slow part) and answers
//!    `Ready`; the old one serves all along.
//! 2. The old process quiesces every device (requests in flight complete, stateful backends
//!    are flushed; VDUSE devices are neither reset nor closed; a vhost-user device is frozen
//!    between two frontend messages with its frontend still connected, see [`vhost_user`])
//!    and sends `Handover`: each device's transport state (for vhost-user the transport's
//!    `HandoverState`: features, memory table, rings, in-flight region, backend channel) and
//!    descriptors (SCM_RIGHTS: the listening socket, the connection, memory, eventfds; the
//!    open `/dev/vduse/NAME`), then the control socket's and the metrics endpoint's
//!    listeners.
//! 3. The new process serves the VDUSE devices, imports every vhost-user connection without
//!    reading from it, starts its control socket and metrics endpoint and answers
//!    `Imported`. The old process lets go of every vhost-user connection (commit) and answers
//!    `Go`: only now does the new process serve them (two processes never handle the same
//!    connection), and it answers `Serving`; the old one exits 0.
//!
//! The frontends notice nothing but the pause: no reconnect, no request lost or repeated.
//!
//! Anything before `Go` that fails — the binary does not start, exits, refuses, is silent
//! past the timeout — and the old process kills the new one (if it runs) and serves its
//! devices again, vhost-user connections exactly where they were: the ctl command returns the
//! error. Should the new process fail between `Go` and `Serving` (a thread it cannot start),
//! the connections died with it: the old process serves the sockets afresh and frontends
//! that reconnect (QEMU: `reconnect-ms`) carry on with their in-flight region.

mod spec;
mod takeover;
pub mod vhost_user;
mod wire;

use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Sender;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::Context;
use virtiod_config::{DeviceKind, DeviceSpec};

use crate::registry::Registry;
pub use takeover::{hello, Hello};
use wire::{DeviceEntry, DeviceState, FailedEntry, Message};

/// How long a new process gets by default to confirm it serves.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Environment variable of a *new* process for tests: `ready` makes it exit before it
/// answers `Ready`, `taken` after it took the devices over but before it answers `Imported`,
/// `go` once the old process let go of the vhost-user connections, before it serves them.
pub const DIE_ENV: &str = "VIRTIOD_DEBUG_UPGRADE_DIE";

/// An upgrade asked for (by `ctl upgrade` or SIGUSR2).
#[derive(Debug)]
pub struct Request {
    /// The new binary (default: the path this daemon was started from).
    pub binary: Option<PathBuf>,
    /// How long the new process has to confirm.
    pub timeout: Duration,
    /// Where the outcome goes: the new process's PID, or what failed.
    pub reply: Option<Sender<Result<u32, String>>>,
}

/// The binary and arguments this daemon was started with.
struct StartedAs {
    binary: Option<PathBuf>,
    args: Vec<OsString>,
}

/// The devices file's text, read at start-up (before Landlock may forbid reading it again).
static CONFIG_TEXT: OnceLock<String> = OnceLock::new();

/// Remember the devices file's text for a new process (`run`, at start-up).
pub fn remember_config(text: String) {
    let _ = CONFIG_TEXT.set(text);
}

static STARTED_AS: OnceLock<StartedAs> = OnceLock::new();

/// Remember the binary (resolved now: once the file is replaced, `/proc/self/exe` names the
/// deleted old one) and the arguments, for the new process. Call at start-up.
pub fn remember_start() {
    let binary = std::fs::read_link("/proc/self/exe").ok();
    let args = strip_takeover(std::env::args_os().skip(1));
    let _ = STARTED_AS.set(StartedAs { binary, args });
}

/// The arguments without a `--takeover-fd N` (this process may be an upgraded one).
fn strip_takeover(args: impl Iterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut skip_next = false;
    for arg in args {
        if std::mem::take(&mut skip_next) {
            continue;
        }
        if arg == "--takeover-fd" {
            skip_next = true;
        } else if !arg.to_string_lossy().starts_with("--takeover-fd=") {
            out.push(arg);
        }
    }
    out
}

/// Devices that cannot move to another process yet: a RAM disk's data lives in this
/// process; a net device's port is on an in-process switch or holds a tap queue.
fn refused(spec: &DeviceSpec) -> Option<&'static str> {
    match &spec.kind {
        DeviceKind::Net(_) => Some("net devices cannot be upgraded in place yet"),
        DeviceKind::Blk if spec.image.starts_with("mem:") => {
            Some("a mem: image lives in this process's memory and would be lost")
        }
        DeviceKind::Blk => None,
    }
}

/// Whether a blk device's image keeps state in the serving process beyond the data (a qcow2
/// image's cached tables, a network backend's connection): flushed by the old process when it
/// quiesces, and opened by the new one only after that (during the pause).
pub fn open_after_handover(spec: &DeviceSpec) -> bool {
    matches!(spec.kind, DeviceKind::Blk) && spec.image.starts_with("qcow2:")
}

/// Whether the old process flushes a blk device's backend when it quiesces it (vhost-user
/// devices always flush: the transport's export does).
pub fn flush_on_handover(spec: &DeviceSpec) -> bool {
    let stateful = ["qcow2:", "nbd:", "nbd+unix:", "rbd:"];
    matches!(spec.kind, DeviceKind::Blk) && stateful.iter().any(|p| spec.image.starts_with(p))
}

/// The old side: hand every device over to a new process, returning its PID. On error the
/// devices serve here again.
pub fn hand_over(
    registry: &Registry,
    listeners: &[Option<BorrowedFd<'_>>; 2],
    req: &Request,
) -> anyhow::Result<u32> {
    if registry.set_upgrading(true) {
        anyhow::bail!("an upgrade is already running: wait for it");
    }
    let (hello, unsupported) = registry.with_devices(|devices, failed| {
        let unsupported: Vec<String> = devices
            .values()
            .filter_map(|d| refused(d.spec()).map(|why| format!("{} ({why})", d.spec().name)))
            .collect();
        let hello = Message::Hello {
            version: wire::VERSION,
            devices: devices
                .values()
                .map(|d| DeviceEntry {
                    spec: spec::to_text(d.spec()),
                })
                .collect(),
            failed: failed
                .values()
                .map(|(s, reason)| FailedEntry {
                    spec: spec::to_text(s),
                    reason: reason.clone(),
                })
                .collect(),
            config: CONFIG_TEXT.get().cloned().unwrap_or_default(),
        };
        (hello, unsupported)
    });
    if !unsupported.is_empty() {
        registry.set_upgrading(false);
        anyhow::bail!(
            "cannot upgrade in place: {}; remove them first (ctl remove) or restart instead",
            unsupported.join(", ")
        );
    }
    let started = Instant::now();
    let deadline = started + req.timeout;
    let mut child = None;
    let mut quiesced = false;
    let result = exchange(
        registry,
        listeners,
        req,
        &hello,
        deadline,
        &mut child,
        &mut quiesced,
    );
    match result {
        Ok(pid) => {
            registry.handed_over();
            tracing::info!(
                new_pid = pid,
                took_ms = started.elapsed().as_millis() as u64,
                "handed every device over; exiting"
            );
            Ok(pid)
        }
        Err(err) => {
            if let Some(mut child) = child {
                let _ = child.kill();
                let _ = child.wait();
            }
            if quiesced {
                resume_all(registry);
            }
            registry.set_upgrading(false);
            tracing::error!("upgrade failed, still serving: {err:#}");
            Err(err.context("upgrade failed; this daemon serves on"))
        }
    }
}

fn exchange(
    registry: &Registry,
    listeners: &[Option<BorrowedFd<'_>>; 2],
    req: &Request,
    hello: &Message,
    deadline: Instant,
    child: &mut Option<Child>,
    quiesced: &mut bool,
) -> anyhow::Result<u32> {
    let started_as = STARTED_AS
        .get()
        .context("the daemon's start-up arguments are unknown")?;
    let binary = req.binary.clone().or(started_as.binary.clone()).context(
        "cannot tell which binary this daemon was started from: give the new one (--binary PATH)",
    )?;
    let (chan, theirs) = wire::pair()?;
    let spawned = Command::new(&binary)
        .args(&started_as.args)
        .arg("--takeover-fd")
        .arg(theirs.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| {
            format!(
                "cannot start the new binary {}: check --binary",
                binary.display()
            )
        })?;
    drop(theirs);
    let pid = spawned.id();
    *child = Some(spawned);
    tracing::info!(binary = %binary.display(), pid, "upgrade: new process started");
    let who = |e: anyhow::Error| {
        e.context(format!(
            "new process {pid} ({}): see its log lines above",
            binary.display()
        ))
    };
    chan.send(hello, &[]).map_err(who)?;
    match chan.recv(deadline, |_| 0).map_err(who)?.0 {
        Message::Ready => {}
        Message::Refused { error } => anyhow::bail!("the new process refused: {error}"),
        other => anyhow::bail!("the new process answered {other:?} instead of ready"),
    }
    let pause = Instant::now();
    *quiesced = true;
    // All at once: a device's pause must not include another's flush.
    registry.with_devices(|devices, _| {
        std::thread::scope(|scope| {
            let quiescing: Vec<_> = devices
                .values_mut()
                .map(|dev| scope.spawn(move || dev.quiesce()))
                .collect();
            quiescing.into_iter().try_for_each(|t| {
                t.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("quiescing a device panicked")))
            })
        })
    })?;
    let sent = registry.with_devices(|devices, _| {
        let mut states = Vec::new();
        let mut fds: Vec<BorrowedFd<'_>> = Vec::new();
        for dev in devices.values() {
            let (state, dev_fds) = dev.handover()?;
            states.push(DeviceState {
                name: dev.spec().name.clone(),
                state,
                fds: dev_fds.len(),
            });
            fds.extend(dev_fds);
        }
        for fd in listeners.iter().flatten() {
            fds.push(fd.as_fd());
        }
        let msg = Message::Handover {
            devices: states,
            control: listeners[0].is_some(),
            metrics: listeners[1].is_some(),
            fds: fds.len(),
        };
        chan.send(&msg, &fds)
    });
    sent.map_err(who)?;
    match chan.recv(deadline, |_| 0).map_err(who)?.0 {
        Message::Imported => {}
        Message::Failed { error } => anyhow::bail!("the new process failed to take over: {error}"),
        other => anyhow::bail!("the new process answered {other:?} instead of imported"),
    }
    // From the first commit on the connections are the new process's: tell it to serve
    // even if a serving thread here is slow to confirm (it serves nothing any more).
    registry.with_devices(|devices, _| {
        for dev in devices.values_mut() {
            if let Err(e) = dev.commit() {
                tracing::warn!("{e:#}");
            }
        }
    });
    chan.send(&Message::Go, &[]).map_err(who)?;
    match chan.recv(deadline, |_| 0).map_err(who)?.0 {
        Message::Serving { pid } => {
            tracing::info!(
                quiesced_ms = pause.elapsed().as_millis() as u64,
                "the new process serves"
            );
            Ok(pid)
        }
        Message::Failed { error } => anyhow::bail!("the new process failed to take over: {error}"),
        other => anyhow::bail!("the new process answered {other:?} instead of serving"),
    }
}

/// Serve every device here again (the hand-over failed).
fn resume_all(registry: &Registry) {
    registry.with_devices(|devices, _| {
        for dev in devices.values_mut() {
            if let Err(e) = dev.resume() {
                tracing::error!("{e:#}");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_earlier_takeover_fd_is_not_passed_on() {
        let args = [
            "run",
            "--config",
            "d.toml",
            "--takeover-fd",
            "7",
            "--control",
            "c",
        ];
        let got = strip_takeover(args.iter().map(OsString::from));
        assert_eq!(got, ["run", "--config", "d.toml", "--control", "c"]);
        let got = strip_takeover(["run", "--takeover-fd=9"].iter().map(OsString::from));
        assert_eq!(got, ["run"]);
    }
}
