//! `virtiod-rng --vhost-user SOCKET`: serve the example virtio-rng device to a vhost-user
//! frontend (QEMU's `vhost-user-rng-pci`), until SIGTERM or SIGINT.

use std::path::PathBuf;
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use virtiod_example_rng::{RngDevice, DEFAULT_QUEUE_SIZE};
use virtiod_vhost_user::{bind_socket, VhostUserDevice};

/// How long stopping waits for the serving thread to notice.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Serve a virtio-rng device (random bytes from the host) over vhost-user.
#[derive(Debug, Parser)]
#[command(name = "virtiod-rng", version)]
struct Args {
    /// Path of the vhost-user socket to create (removed at exit).
    #[arg(long, value_name = "SOCKET")]
    vhost_user: PathBuf,
    /// Largest queue size the driver may choose (a power of two).
    #[arg(long, default_value_t = DEFAULT_QUEUE_SIZE)]
    queue_size: u16,
}

/// What the main thread waits for.
enum Event {
    /// SIGTERM or SIGINT.
    Signal(i32),
    /// The serving thread ended by itself.
    Exited(Result<(), String>),
}

fn main() {
    let args = Args::parse();
    if let Err(err) = run(args) {
        eprintln!("virtiod-rng: error: {err:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    anyhow::ensure!(
        args.queue_size.is_power_of_two(),
        "--queue-size {} is not a power of two: use e.g. 256",
        args.queue_size
    );
    let device = Arc::new(RngDevice::new(args.queue_size));
    let dev = VhostUserDevice::new(device, Duration::ZERO)?;
    let (events, rx) = channel();
    forward_signals(events.clone())?;
    // Bind last: nothing is created unless everything before succeeded.
    let socket = args.vhost_user;
    let listener = bind_socket(&socket)?;
    let server = dev
        .spawn(listener, &socket, "vhost-user", move |result| {
            let _ = events.send(Event::Exited(result.map_err(|e| e.to_string())));
        })
        .context("cannot start the vhost-user thread")?;
    tracing::info!(socket = %socket.display(), "serving virtio-rng over vhost-user");
    let result = match rx.recv() {
        Ok(Event::Signal(sig)) => {
            tracing::info!(signal = sig, "stopping");
            Ok(())
        }
        Ok(Event::Exited(result)) => result
            .map_err(anyhow::Error::msg)
            .context("the vhost-user server stopped"),
        Err(_) => Ok(()),
    };
    if let Err(err) = server.stop(STOP_TIMEOUT) {
        tracing::warn!(%err, "stopping the device");
    }
    tracing::info!("stopped");
    result
}

/// Forward SIGTERM/SIGINT to the main thread.
fn forward_signals(events: Sender<Event>) -> anyhow::Result<()> {
    let mut signals = Signals::new([SIGTERM, SIGINT]).context("cannot install signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if events.send(Event::Signal(sig)).is_err() {
                    break;
                }
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}
