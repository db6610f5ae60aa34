//! `virtiod serve`: one image, one device, over vhost-user or VDUSE.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use virtiod_backend::{Backend, OpenOptions};
use virtiod_blk::BlkConfig;
use virtiod_vduse::{Attach, VduseBlk, VduseOptions};
use virtiod_vhost_user::{bind_socket, VhostUserBlk};

use crate::cli::{AttachArg, ServeArgs};

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    // Validate and open everything before creating anything.
    let backend = virtiod_backend::open(
        &args.image,
        OpenOptions {
            read_only: args.read_only,
            buffered: args.buffered,
        },
    )?;
    let info = backend.info();
    let cfg = BlkConfig::new(&info, args.queues, args.queue_size, &args.serial);
    tracing::info!(
        image = %args.image,
        capacity = info.capacity,
        queues = args.queues,
        queue_size = args.queue_size,
        read_only = info.read_only,
        "opened image"
    );
    let signals = Signals::new([SIGTERM, SIGINT]).context("cannot install signal handlers")?;
    match (&args.vhost_user, &args.vduse) {
        (Some(socket), _) => serve_vhost_user(cfg, backend, socket, args.poll_us, signals),
        (None, Some(name)) => serve_vduse(cfg, backend, name, &args, signals),
        (None, None) => anyhow::bail!("give --vhost-user SOCKET or --vduse NAME"),
    }
}

fn serve_vduse(
    cfg: BlkConfig,
    backend: Arc<dyn Backend>,
    name: &str,
    args: &ServeArgs,
    mut signals: Signals,
) -> anyhow::Result<()> {
    let attach = match args.attach {
        AttachArg::Virtio => Attach::Virtio,
        AttachArg::Vhost => Attach::Vhost,
        AttachArg::None => Attach::None,
    };
    let opts = VduseOptions {
        name: name.to_string(),
        attach,
        state_dir: args.state_dir.clone(),
        poll: std::time::Duration::from_micros(args.poll_us),
    };
    let device = VduseBlk::create(cfg, backend, &opts)?;
    match device.node() {
        Some(node) => {
            tracing::info!(name, node = %node.display(), "serving virtio-blk through VDUSE");
            // The one line scripts wait for: the usable device node.
            println!("{}", node.display());
        }
        None => {
            tracing::info!(
                name,
                "VDUSE device created; attach it with: vdpa dev add name {name} mgmtdev vduse"
            );
            println!("/dev/vduse/{name}");
        }
    }
    if let Some(sig) = signals.forever().next() {
        tracing::info!(
            signal = sig,
            "stopping: detaching and destroying the device"
        );
    }
    device.shutdown()?;
    tracing::info!("stopped cleanly");
    Ok(())
}

fn serve_vhost_user(
    cfg: BlkConfig,
    backend: Arc<dyn Backend>,
    socket: &Path,
    poll_us: u64,
    mut signals: Signals,
) -> anyhow::Result<()> {
    let device = VhostUserBlk::new(cfg, backend)?;
    device.set_poll_us(poll_us);
    // Bind last: nothing is created unless everything before succeeded.
    let listener = bind_socket(socket)?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let device = device.clone();
        let stop = stop.clone();
        let socket = socket.to_path_buf();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    tracing::info!(signal = sig, "stopping: completing in-flight requests");
                    stop.store(true, Ordering::Release);
                    let (_quiesced, flushed) = device.quiesce();
                    let _ = std::fs::remove_file(&socket);
                    match flushed {
                        Ok(()) => {
                            tracing::info!("stopped cleanly");
                            std::process::exit(0)
                        }
                        Err(err) => {
                            tracing::error!(%err, "final flush failed: data may not be durable");
                            std::process::exit(1)
                        }
                    }
                }
            })
            .context("cannot start the signal thread")?;
    }
    tracing::info!(socket = %socket.display(), "serving virtio-blk over vhost-user");
    let result = device.serve(listener, &stop);
    let _ = std::fs::remove_file(socket);
    result.context("vhost-user server failed")
}
