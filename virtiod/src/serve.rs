//! `virtiod serve`: one image, one device.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use signal_hook::consts::{SIGINT, SIGTERM};
use virtiod_backend::OpenOptions;
use virtiod_blk::BlkConfig;
use virtiod_vhost_user::{bind_socket, VhostUserBlk};

use crate::cli::ServeArgs;

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let backend = virtiod_backend::open(
        &args.image,
        OpenOptions {
            read_only: args.read_only,
            buffered: args.buffered,
        },
    )?;
    let info = backend.info();
    let cfg = BlkConfig::new(&info, args.queues, args.queue_size, &args.serial);
    let device = VhostUserBlk::new(cfg, backend)?;
    // Bind last: nothing is created unless everything before succeeded.
    let listener = bind_socket(&args.vhost_user)?;
    let socket = args.vhost_user.clone();
    let stop = Arc::new(AtomicBool::new(false));
    {
        let device = device.clone();
        let stop = stop.clone();
        let socket = socket.clone();
        let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
            .context("cannot install signal handlers")?;
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
    tracing::info!(
        image = %args.image,
        socket = %socket.display(),
        capacity = info.capacity,
        queues = args.queues,
        queue_size = args.queue_size,
        read_only = info.read_only,
        "serving virtio-blk over vhost-user"
    );
    let result = device.serve(listener, &stop);
    let _ = std::fs::remove_file(&socket);
    result.context("vhost-user server failed")
}
