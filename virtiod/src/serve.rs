//! `virtiod serve`: one image, one device, over vhost-user or VDUSE.

use std::sync::mpsc::{channel, Receiver};

use anyhow::Context;
use virtiod_config::{Attach, DeviceKind, DeviceSpec, NetSpec, Transport};

use crate::cli::{AttachArg, ServeArgs};
use crate::device::Event;
use crate::registry::Registry;
use crate::signals::forward_signals;

/// The device `serve`'s flags describe.
fn spec_of(args: &ServeArgs) -> anyhow::Result<DeviceSpec> {
    let transport = match (&args.vhost_user, &args.vduse) {
        (Some(socket), _) => Transport::VhostUser(socket.clone()),
        (None, Some(name)) => Transport::Vduse {
            name: name.clone(),
            attach: match args.attach {
                AttachArg::Virtio => Attach::Virtio,
                AttachArg::Vhost => Attach::Vhost,
                AttachArg::None => Attach::None,
            },
        },
        (None, None) => anyhow::bail!("give --vhost-user SOCKET or --vduse NAME"),
    };
    let name = match &transport {
        Transport::VhostUser(socket) => socket
            .file_stem()
            .map_or("vhost-user".into(), |s| s.to_string_lossy().into_owned()),
        Transport::Vduse { name, .. } => name.clone(),
    };
    let (image, kind) = match virtiod_config::parse_cli_net(&args.image) {
        Some(backend) => {
            let backend = backend.map_err(crate::usage::Usage)?;
            let net = NetSpec {
                backend,
                mac: args.mac,
                mtu: args.mtu,
            };
            (String::new(), DeviceKind::Net(net))
        }
        None => {
            if args.mac.is_some() || args.mtu.is_some() {
                return Err(crate::usage::Usage(
                    "--mac and --mtu are for net devices: give net:switch=NAME or net:tap=NAME instead of an image"
                        .into(),
                )
                .into());
            }
            (args.image.clone(), DeviceKind::Blk)
        }
    };
    let qos = virtiod_config::qos_from_pairs(args.qos.pairs()).map_err(crate::usage::Usage)?;
    if !qos.is_unlimited() && matches!(kind, DeviceKind::Net(_)) {
        return Err(crate::usage::Usage(
            "QoS limits (--iops, --bps, ...) are for blk devices: remove them for a net device"
                .into(),
        )
        .into());
    }
    Ok(DeviceSpec {
        name,
        image,
        kind,
        transport,
        queues: args.queues,
        queue_size: args.queue_size,
        read_only: args.read_only,
        buffered: args.buffered,
        serial: args.serial.clone(),
        poll_us: args.poll_us,
        qos,
    })
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let spec = spec_of(&args)?;
    let daemon = virtiod_config::DaemonSettings::default();
    let setup = crate::confine::Setup {
        specs: std::slice::from_ref(&spec),
        state_dir: &args.state_dir,
        control: args.control.as_deref(),
        metrics: args.metrics,
    };
    crate::confine::begin(&args.confine, &daemon, &setup)?;
    let vduse = matches!(spec.transport, Transport::Vduse { .. });
    let (tx, rx) = channel();
    forward_signals(tx.clone())?;
    let registry = Registry::new(&args.state_dir, tx);
    if let Some(addr) = args.metrics {
        crate::metrics::start(addr, registry.clone())?;
    }
    let endpoint = registry.add(spec)?;
    if vduse {
        // The one line scripts wait for: the usable device node.
        println!("{}", endpoint.display());
    }
    let _control = match &args.control {
        Some(path) => Some(crate::control::start(path, registry.clone())?),
        None => None,
    };
    crate::confine::started();
    crate::notify::notify("READY=1");
    wait_and_stop(&registry, &rx, args.on_stop.unwrap_or_default())
}

fn wait_and_stop(
    registry: &Registry,
    rx: &Receiver<Event>,
    on_stop: virtiod_config::OnStop,
) -> anyhow::Result<()> {
    let event = loop {
        match rx.recv() {
            Ok(Event::Upgrade(req)) => {
                let why = "upgrade in place is for `virtiod run` daemons: restart `serve` \
                           instead (a VDUSE device is re-opened without losing I/O)";
                tracing::warn!("{why}");
                if let Some(reply) = req.reply {
                    let _ = reply.send(Err(why.to_string()));
                }
            }
            other => break other,
        }
    };
    crate::notify::notify("STOPPING=1");
    match event {
        Ok(Event::Exited { result, .. }) => {
            let _ = registry.stop_all();
            match result {
                Ok(()) => Ok(()),
                Err(e) => Err(anyhow::anyhow!(e)).context("vhost-user server failed"),
            }
        }
        Ok(Event::Signal(sig)) => {
            tracing::info!(signal = sig, "stopping: completing in-flight requests");
            match on_stop {
                virtiod_config::OnStop::Remove => registry.stop_all(),
                virtiod_config::OnStop::Keep => registry.keep_all(),
            }
        }
        Ok(Event::Upgrade(_)) | Err(_) => registry.stop_all(),
    }
}
