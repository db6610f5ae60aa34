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
//! The frontend is untrusted: messages are read whole however they are split (`wire.rs`),
//! memory regions must lie in their files, and a frontend that shrinks its memory later is
//! cut off without harming the process or other devices (`fault.rs`, docs/security.md).

#![deny(missing_docs)]

mod backend_channel;
mod fault;
mod handler;
pub mod inflight;
mod queue;
mod server;
mod socket;
mod wire;

use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost::vhost_user::{BackendReqHandler, Error as VuError};
use virtiod_core::{Device, DeviceError, QueueService};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend_channel::{BackendChannel, ConfigChange};
use crate::fault::FrontendMemory;
use crate::handler::Connection;
use crate::queue::{lock, QueueState, QueueThread};
use crate::wire::{Wire, WireError};

pub use server::Server;
pub use socket::bind_socket;

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
    /// connecting once; [`Self::spawn`] and [`Server::stop`] do all of that) or an error
    /// occurs.
    pub fn serve(self: &Arc<Self>, listener: UnixListener, stop: &AtomicBool) -> Result<(), Error> {
        while !stop.load(Ordering::Acquire) {
            let (stream, _) = listener
                .accept()
                .map_err(|e| Error::Daemon(format!("accepting a frontend: {e}")))?;
            if stop.load(Ordering::Acquire) {
                break;
            }
            tracing::info!("frontend connected");
            let result = self.serve_connection(stream);
            tracing::info!(?result, "frontend disconnected");
        }
        Ok(())
    }

    /// Serve one frontend until it disconnects (or breaks the protocol), then complete what it
    /// left in flight and forget its set-up.
    fn serve_connection(self: &Arc<Self>, stream: UnixStream) -> Result<(), VuError> {
        *self.connection.lock().unwrap_or_else(|e| e.into_inner()) = stream.try_clone().ok();
        let mut threads = Vec::with_capacity(self.queues.len());
        let mut result = Ok(());
        for q in &self.queues {
            match QueueThread::spawn(q.clone()) {
                Ok(t) => threads.push(t),
                Err(err) => {
                    tracing::error!(%err, "cannot start a queue thread");
                    result = Err(VuError::ReqHandlerError(err));
                }
            }
        }
        if result.is_ok() {
            result = self.handle_messages(stream);
        }
        self.connection
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        self.backend_channel().take();
        for q in &self.queues {
            let mut st = lock(q);
            st.drain();
            st.reset();
        }
        for t in threads {
            t.stop();
        }
        // Nothing refers to the frontend's memory any more: unmap it.
        self.frontend_memory().release_unused();
        result
    }

    /// Handle the frontend's messages until it disconnects, breaks the protocol or shrinks
    /// the memory it shared.
    fn handle_messages(self: &Arc<Self>, stream: UnixStream) -> Result<(), VuError> {
        let setup = EventFd::new(EFD_NONBLOCK)
            .map(Arc::new)
            .and_then(|wake| Ok((Wire::new(stream, wake.clone())?, wake)));
        let ((mut wire, handler_end), wake) = setup.map_err(VuError::ReqHandlerError)?;
        let conn = Arc::new(Mutex::new(Connection::new(self.clone(), wake)));
        let mut requests = BackendReqHandler::from_stream(handler_end, conn.clone());
        loop {
            match wire.forward_request() {
                Ok(true) => {}
                Ok(false) => continue, // answered by the wire itself
                Err(WireError::Disconnected) => return Ok(()),
                Err(WireError::MemoryShrunk) => {
                    self.report_shrunk(&conn);
                    return Err(VuError::ReqHandlerError(std::io::Error::other(
                        WireError::MemoryShrunk.to_string(),
                    )));
                }
                Err(err) => {
                    tracing::warn!(%err, "reading a vhost-user message failed; closing the connection");
                    return Err(VuError::ReqHandlerError(std::io::Error::other(
                        err.to_string(),
                    )));
                }
            }
            let handled = requests.handle_request();
            let replied = wire.forward_replies();
            if let Some(sock) = wire.take_backend_channel() {
                if handled.is_ok() {
                    let acked = conn
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .acked_protocol();
                    match BackendChannel::new(sock, acked) {
                        Ok(channel) => *self.backend_channel() = Some(channel),
                        Err(err) => {
                            tracing::warn!(%err, "cannot use the frontend's backend channel")
                        }
                    }
                }
            }
            match handled {
                Ok(()) => {}
                Err(VuError::Disconnected | VuError::PartialMessage) => return Ok(()),
                Err(err) => {
                    tracing::warn!(%err, "vhost-user request failed; closing the connection");
                    return Err(err);
                }
            }
            replied.map_err(VuError::ReqHandlerError)?;
        }
    }

    /// Log, once per connection, which memory the frontend shrank.
    fn report_shrunk(&self, conn: &Mutex<Connection>) {
        for m in self.frontend_memory().regions().filter(|m| m.poisoned()) {
            use vm_memory::GuestMemoryRegion;
            tracing::error!(
                gpa = format_args!("{:#x}", m.region.start_addr().0),
                size = format_args!("{:#x}", m.region.len()),
                fd_size_now = m.file_size(),
                "the frontend shrank a memory region it shared (accesses past its end read zeroes)"
            );
        }
        if conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .inflight_poisoned()
        {
            tracing::error!("the frontend shrank the in-flight region it shared");
        }
        tracing::error!(
            "frontend memory shrunk under the device: stopping its queues and disconnecting it"
        );
    }
}
