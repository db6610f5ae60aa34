//! The new side of an upgrade: take the devices over from the process that started this one
//! (`run --takeover-fd N`).
//!
//! Until it confirms ([`Pending::serving`]) this process must never clean up what it was
//! handed (a VDUSE device it serves would be destroyed on drop): every failure ends it with
//! [`std::process::exit`], and the old process serves on. Vhost-user connections are
//! imported at once but served only after the old process's `Go`: until then it may still
//! take them back.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use anyhow::Context;
use virtiod_config::{DeviceSpec, Transport};

use super::wire::{Channel, Message};
use super::{DEFAULT_TIMEOUT, DIE_ENV};
use crate::device::{Device, Event, Handed, Opened};
use crate::registry::Registry;

/// Devices taken over; the confirmation is still due.
pub struct Pending {
    chan: Channel,
    /// The control socket's listener, if the old process had one.
    pub control: Option<UnixListener>,
    /// The metrics endpoint's listener, if the old process had one.
    pub metrics: Option<std::net::TcpListener>,
}

impl Pending {
    /// Tell the old process every device is taken over, wait until it let go of the
    /// vhost-user connections, serve them, and confirm (it exits). Never returns on failure:
    /// the old process serves on (see the module).
    pub fn serving(self, registry: &Registry) {
        die_if("taken");
        if let Err(err) = self.go(registry) {
            fail(&self.chan, &err);
        }
    }

    fn go(&self, registry: &Registry) -> anyhow::Result<()> {
        self.chan.send(&Message::Imported, &[])?;
        match self.chan.recv(Instant::now() + DEFAULT_TIMEOUT, |_| 0)?.0 {
            Message::Go => {}
            other => anyhow::bail!("expected the old process's go, got {other:?}"),
        }
        die_if("go");
        registry.with_devices(|devices, _| {
            devices
                .values_mut()
                .try_for_each(|dev| dev.serve_imported())
        })?;
        self.chan.send(
            &Message::Serving {
                pid: std::process::id(),
            },
            &[],
        )
    }

    /// Taking over failed after the devices came: tell the old process and end here without
    /// cleaning anything up.
    pub fn fail(self, err: &anyhow::Error) -> ! {
        fail(&self.chan, err)
    }
}

fn fail(chan: &Channel, err: &anyhow::Error) -> ! {
    let error = format!("{err:#}");
    let _ = chan.send(
        &Message::Failed {
            error: error.clone(),
        },
        &[],
    );
    eprintln!("virtiod: error: taking over failed, the old process serves on: {error}");
    std::process::exit(1);
}

/// Exit as a crashing new process would, when the test variable asks for it at `point`.
fn die_if(point: &str) {
    if std::env::var(DIE_ENV).is_ok_and(|v| v == point) {
        eprintln!("virtiod: {DIE_ENV}={point}: exiting");
        std::process::exit(70);
    }
}

/// What the old process sends first: the devices to take over.
pub struct Hello {
    chan: Channel,
    /// The devices it serves.
    pub specs: Vec<DeviceSpec>,
    failed: Vec<(DeviceSpec, String)>,
    /// Its devices file (for the `[daemon]` settings).
    pub config: String,
}

/// Receive the old process's hello on the inherited descriptor `fd`. Call before any thread
/// starts: the process confines itself (Landlock) for what it lists. Never returns an error:
/// a failure ends the process (see the module).
pub fn hello(fd: RawFd) -> Hello {
    // SAFETY: `fd` is the hand-over socket the old process made inheritable for this
    // process (`--takeover-fd`); nothing else in this process owns it.
    let chan = Channel::from_fd(unsafe { OwnedFd::from_raw_fd(fd) });
    match receive_hello(&chan) {
        Ok((specs, failed, config)) => Hello {
            chan,
            specs,
            failed,
            config,
        },
        Err(err) => fail(&chan, &err),
    }
}

type Parsed = (Vec<DeviceSpec>, Vec<(DeviceSpec, String)>, String);

fn receive_hello(chan: &Channel) -> anyhow::Result<Parsed> {
    let deadline = Instant::now() + DEFAULT_TIMEOUT;
    let (hello, _) = chan.recv(deadline, |_| 0)?;
    let Message::Hello {
        version,
        devices,
        failed,
        config,
    } = hello
    else {
        anyhow::bail!("expected the old process's hello, got {hello:?}");
    };
    anyhow::ensure!(
        version == super::wire::VERSION,
        "the old process speaks hand-over version {version}, this binary {}: restart instead",
        super::wire::VERSION
    );
    let parse = |text: &str| {
        virtiod_config::parse_device(text)
            .map_err(|e| anyhow::anyhow!("a device from the old process: {e}"))
    };
    let specs = devices
        .iter()
        .map(|d| parse(&d.spec))
        .collect::<anyhow::Result<_>>()?;
    let failed = failed
        .into_iter()
        .filter_map(|f| parse(&f.spec).ok().map(|s| (s, f.reason)))
        .collect();
    Ok((specs, failed, config))
}

impl Hello {
    /// Open every device, tell the old process, receive the hand-over and serve every device
    /// (they are in `registry` when this returns). Never returns an error: a failure ends
    /// the process (see the module).
    pub fn take_over(
        self,
        registry: &Registry,
        state_dir: &Path,
        events: Sender<Event>,
    ) -> Pending {
        let Hello {
            chan,
            specs,
            failed,
            ..
        } = self;
        match receive(&chan, specs, failed, registry, state_dir, events) {
            Ok((control, metrics)) => Pending {
                chan,
                control,
                metrics,
            },
            Err(err) => fail(&chan, &err),
        }
    }
}

type Listeners = (Option<UnixListener>, Option<std::net::TcpListener>);

fn receive(
    chan: &Channel,
    specs: Vec<DeviceSpec>,
    failed: Vec<(DeviceSpec, String)>,
    registry: &Registry,
    state_dir: &Path,
    events: Sender<Event>,
) -> anyhow::Result<Listeners> {
    // Images are opened now, while the old process serves — except those whose metadata it
    // may still change in its own memory (qcow2): those once it has flushed and let go.
    let mut opened: Vec<(DeviceSpec, Option<Opened>)> = Vec::new();
    for spec in specs {
        let dev = match super::open_after_handover(&spec) {
            true => None,
            false => Some(Device::open(&spec).with_context(|| format!("device {}", spec.name))?),
        };
        opened.push((spec, dev));
    }
    die_if("ready");
    chan.send(&Message::Ready, &[])?;
    // The old process now quiesces its devices: from here on, be quick.
    let (msg, fds) = chan.recv(Instant::now() + Duration::from_secs(60), |m| match m {
        Message::Handover { fds, .. } => *fds,
        _ => 0,
    })?;
    let paused = Instant::now();
    let Message::Handover {
        devices: states,
        control,
        metrics,
        ..
    } = msg
    else {
        anyhow::bail!("expected the hand-over, got {msg:?}");
    };
    anyhow::ensure!(
        states.len() == opened.len(),
        "the old process handed over {} devices for {}",
        states.len(),
        opened.len()
    );
    let mut fds = fds.into_iter();
    let mut handed = Vec::new();
    for ((spec, dev), state) in opened.into_iter().zip(states) {
        let mismatch = || {
            format!(
                "the hand-over of device {} does not match its description",
                spec.name
            )
        };
        anyhow::ensure!(state.name == spec.name, mismatch());
        let mut own: Vec<OwnedFd> = fds.by_ref().take(state.fds).collect();
        anyhow::ensure!(own.len() == state.fds, "descriptors are missing");
        let fd = match spec.transport {
            Transport::VhostUser(_) => {
                let handover = state
                    .state
                    .get("handover")
                    .cloned()
                    .with_context(mismatch)?;
                Handed::VhostUser {
                    state: Box::new(serde_json::from_value(handover).with_context(mismatch)?),
                    fds: own,
                }
            }
            Transport::Vduse { .. } => {
                anyhow::ensure!(own.len() == 1, mismatch());
                Handed::Vduse(own.remove(0))
            }
        };
        handed.push((spec, dev, fd));
    }
    // All at once (from this unconfined thread's scope): a device's pause must not include
    // another's (a qcow2 image being opened, a VDUSE node being looked up).
    let served: Vec<anyhow::Result<Device>> = std::thread::scope(|scope| {
        let serving: Vec<_> = handed
            .into_iter()
            .map(|(spec, dev, fd)| {
                let events = events.clone();
                scope.spawn(move || {
                    let name = spec.name.clone();
                    let dev = match dev {
                        Some(dev) => dev,
                        None => Device::open(&spec).with_context(|| format!("device {name}"))?,
                    };
                    Device::serve(spec, dev, state_dir, events, Some(fd))
                        .with_context(|| format!("device {name}"))
                })
            })
            .collect();
        serving
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("taking a device over panicked")))
            })
            .collect()
    });
    if let Some(err) = served.iter().find_map(|r| r.as_ref().err()) {
        let err = anyhow::anyhow!("{err:#}");
        // Never drop a device served here: dropping a VDUSE device destroys it.
        std::mem::forget(served);
        return Err(err);
    }
    for dev in served.into_iter().flatten() {
        registry.adopt(dev);
    }
    let control = control
        .then(|| fds.next().map(UnixListener::from))
        .flatten();
    let metrics = metrics
        .then(|| fds.next().map(std::net::TcpListener::from))
        .flatten();
    for (spec, reason) in failed {
        registry.adopt_failed(spec, reason);
    }
    tracing::info!(
        devices = registry.running(),
        took_ms = paused.elapsed().as_millis() as u64,
        "took the devices over"
    );
    Ok((control, metrics))
}
