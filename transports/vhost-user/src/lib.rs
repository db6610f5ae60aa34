//! vhost-user transport: serves any [`Device`] of the core (virtio-blk, or a device of your
//! own) to a vhost-user frontend (QEMU, cloud-hypervisor, libblkio) over a unix socket.
//!
//! The `vhost` crate parses the protocol; `handler` decides what each message does. Each
//! queue has one thread (per connection) and one [`QueueService`] with the device's handler
//! (and with it, for virtio-blk, one backend I/O context, e.g. one `io_uring`), so queues
//! never share a lock on the hot path. After a
//! frontend disconnects, in-flight requests are drained and the daemon waits for the next
//! frontend on the same socket.
//!
//! With `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`, every request taken off a ring is recorded in
//! memory the frontend keeps ([`inflight`]); a daemon restarted after a crash finds there what
//! its predecessor had in flight and executes it again when the ring starts.
//!
//! A live connection can be handed over to another process (upgrade in place) without the
//! frontend noticing: [`VhostUserDevice::export`] freezes it between two messages and gives
//! its state and descriptors, [`VhostUserDevice::import`] in the new process serves it on,
//! [`Export::resume`] lets the old process carry on if the new one fails
//! (docs/architecture.md, "Handing a connection over").
//!
//! The frontend is untrusted: messages are read whole however they are split (`wire.rs`),
//! memory regions must lie in their files, and a frontend that shrinks its memory later is
//! cut off without harming the process or other devices (`fault.rs`, docs/security.md).

#![deny(missing_docs)]

mod backend_channel;
mod fault;
mod handler;
mod handover;
pub mod inflight;
mod queue;
mod server;
mod session;
mod socket;
mod wire;

use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use virtiod_core::{Device, DeviceError, QueueService};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend_channel::{BackendChannel, ConfigChange};
use crate::fault::FrontendMemory;
use crate::queue::{lock, QueueState};

pub use handover::{
    ConnectionState, Export, HandoverError, HandoverState, Imported, InflightState, RegionState,
    VringState, HANDOVER_VERSION,
};
pub use queue::RingState;
pub use server::Server;
pub use socket::bind_socket;
pub use wire::WireState;

/// Errors of the vhost-user transport.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be set up.
    #[error("{0}")]
    Socket(String),
    /// The device could not set up a queue.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// Serving a frontend failed.
    #[error("vhost-user: {0}")]
    Daemon(String),
}

/// Proof that a device is quiesced: its queues accept no requests while this lives.
pub struct Quiesced<'a> {
    _guards: Vec<MutexGuard<'a, QueueState>>,
}

/// A device served over vhost-user.
pub struct VhostUserDevice {
    device: Arc<dyn Device>,
    queues: Vec<Arc<Mutex<QueueState>>>,
    /// The current frontend's socket (a clone), to cut it off.
    connection: Mutex<Option<UnixStream>>,
    /// The frontend's memory regions mapped by this device (unmapped once unused).
    frontend_memory: Mutex<FrontendMemory>,
    /// The current frontend's backend channel, if it gave one (`SET_BACKEND_REQ_FD`).
    backend_channel: Mutex<Option<BackendChannel>>,
    /// Written by [`Self::export`] to stop the serving thread between two messages.
    handover_wake: Arc<EventFd>,
    /// The export asked for, until the serving thread takes it.
    handover: Mutex<Option<handover::Request>>,
    /// The socket and connection were handed over: this device serves nothing any more.
    handed_over: AtomicBool,
    /// Frontends accepted on the listening socket.
    accepted: AtomicU64,
}

impl VhostUserDevice {
    /// Serve `device`, with one queue service (and handler) per queue, each busy-polling
    /// adaptively for at most `max_poll` after its last request (zero: never poll).
    pub fn new(device: Arc<dyn Device>, max_poll: Duration) -> Result<Arc<Self>, Error> {
        let size = device.max_queue_size();
        let queues = (0..device.num_queues())
            .map(|index| {
                let handler = device.queue_handler(index)?;
                let svc = QueueService::new(index, handler, size, max_poll)
                    .map_err(|e| Error::Daemon(format!("queue size {size}: {e}")))?;
                Ok(Arc::new(Mutex::new(QueueState::new(
                    usize::from(index),
                    svc,
                ))))
            })
            .collect::<Result<_, Error>>()?;
        let this = Arc::new(Self {
            device,
            queues,
            connection: Mutex::new(None),
            frontend_memory: Mutex::new(FrontendMemory::default()),
            backend_channel: Mutex::new(None),
            handover_wake: Arc::new(
                EventFd::new(EFD_NONBLOCK)
                    .map_err(|e| Error::Daemon(format!("creating an eventfd: {e}")))?,
            ),
            handover: Mutex::new(None),
            handed_over: AtomicBool::new(false),
            accepted: AtomicU64::new(0),
        });
        this.device
            .set_config_notifier(Some(Arc::new(ConfigChange(Arc::downgrade(&this)))));
        Ok(this)
    }

    fn backend_channel(&self) -> MutexGuard<'_, Option<BackendChannel>> {
        self.backend_channel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn frontend_memory(&self) -> MutexGuard<'_, FrontendMemory> {
        self.frontend_memory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Virtio features offered to the frontend.
    fn features(&self) -> u64 {
        self.device.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    /// Disconnect the frontend that is connected now, if any (its requests in flight should
    /// be completed first, see [`Self::quiesce`]). [`Self::serve`] then waits for the next one.
    pub fn disconnect(&self) {
        if let Some(conn) = self
            .connection
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = conn.shutdown(Shutdown::Both);
        }
    }

    /// Stop taking requests, complete everything in flight, and stop the device (virtio-blk:
    /// flush the backend). The queues stay locked (no new request starts) until the returned
    /// guard is dropped; a daemon that is exiting simply exits while holding it.
    pub fn quiesce(&self) -> (Quiesced<'_>, Result<(), DeviceError>) {
        let mut guards = Vec::new();
        for q in &self.queues {
            let mut g = lock(q);
            g.drain();
            guards.push(g);
        }
        let stopped = self.device.stop();
        (Quiesced { _guards: guards }, stopped)
    }

    /// Serve frontends on `listener`, one after the other, until `stop` is set (checked
    /// between connections: a caller that sets it must also wake `accept`, e.g. by
    /// connecting once; [`Self::spawn`] and [`Server::stop`] do all of that), an error
    /// occurs, or the device is handed over to another process ([`Self::export`], then
    /// [`Export::commit`]).
    pub fn serve(self: &Arc<Self>, listener: UnixListener, stop: &AtomicBool) -> Result<(), Error> {
        self.serve_from(listener, None, stop)
    }

    /// Frontends accepted on the listening socket since the device was created (a connection
    /// taken over from another process is not counted).
    pub fn connections_accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Whether the device handed its socket and connection over to another process (it
    /// serves nothing any more).
    pub fn handed_over(&self) -> bool {
        self.handed_over.load(Ordering::Acquire)
    }
}
