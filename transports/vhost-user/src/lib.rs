//! vhost-user-blk transport: serves a virtio-blk engine to a vhost-user frontend (QEMU,
//! cloud-hypervisor, libblkio) over a unix socket.
//!
//! The `vhost` crate parses the protocol; [`handler`] decides what each message does. Each
//! queue has one thread (per connection) and one [`QueueWorker`] (and with it one backend I/O
//! context, e.g. one `io_uring`), so queues never share a lock on the hot path. After a
//! frontend disconnects, in-flight requests are drained and the daemon waits for the next
//! frontend on the same socket.
//!
//! With `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`, every request taken off a ring is recorded in
//! memory the frontend keeps ([`inflight`]); a daemon restarted after a crash finds there what
//! its predecessor had in flight and executes it again when the ring starts.
//!
//! The frontend is untrusted: messages are read whole however they are split ([`wire`]),
//! memory regions must lie in their files, and a frontend that shrinks its memory later is
//! cut off without harming the process or other devices ([`fault`], docs/security.md).

mod fault;
mod handler;
pub mod inflight;
mod queue;
mod socket;
mod wire;

use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost::vhost_user::{BackendReqHandler, Error as VuError};
use virtio_queue::{Queue, QueueT};
use virtiod_backend::Backend;
use virtiod_blk::{BlkConfig, QueueWorker, Stats};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::fault::FrontendMemory;
use crate::handler::Connection;
use crate::queue::{lock, QueueState, QueueThread};
use crate::wire::{Wire, WireError};

pub use socket::bind_socket;

/// Errors of the vhost-user transport.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be set up.
    #[error("{0}")]
    Socket(String),
    /// The device engine could not be set up.
    #[error("cannot set up queue {queue}")]
    Worker {
        /// Queue index.
        queue: usize,
        /// Cause.
        source: virtiod_blk::WorkerError,
    },
    /// Serving a frontend failed.
    #[error("vhost-user: {0}")]
    Daemon(String),
}

/// Proof that a device is quiesced: its queues accept no requests while this lives.
pub struct Quiesced<'a> {
    _guards: Vec<MutexGuard<'a, QueueState>>,
}

/// A virtio-blk device served over vhost-user.
pub struct VhostUserBlk {
    cfg: Arc<BlkConfig>,
    backend: Arc<dyn Backend>,
    stats: Arc<Stats>,
    queues: Vec<Arc<Mutex<QueueState>>>,
    poll_us: Arc<AtomicU64>,
    /// The current frontend's socket (a clone), to cut it off.
    connection: Mutex<Option<UnixStream>>,
    /// The frontend's memory regions mapped by this device (unmapped once unused).
    frontend_memory: Mutex<FrontendMemory>,
}

impl VhostUserBlk {
    /// A device over `backend` described by `cfg`, with one worker per queue.
    pub fn new(cfg: BlkConfig, backend: Arc<dyn Backend>) -> Result<Arc<Self>, Error> {
        let cfg = Arc::new(cfg);
        let stats = Arc::new(Stats::new(cfg.num_queues as usize));
        let queues = (0..cfg.num_queues as usize)
            .map(|queue| {
                let worker = QueueWorker::new(cfg.clone(), backend.as_ref(), stats.clone(), queue)
                    .map_err(|source| Error::Worker { queue, source })?;
                let ring = Queue::new(cfg.queue_size)
                    .map_err(|e| Error::Daemon(format!("queue size {}: {e}", cfg.queue_size)))?;
                Ok(Arc::new(Mutex::new(QueueState::new(queue, worker, ring))))
            })
            .collect::<Result<_, Error>>()?;
        Ok(Arc::new(Self {
            cfg,
            backend,
            stats,
            queues,
            poll_us: Arc::new(AtomicU64::new(0)),
            connection: Mutex::new(None),
            frontend_memory: Mutex::new(FrontendMemory::default()),
        }))
    }

    /// Busy-poll each queue for up to `us` microseconds after the last request before
    /// sleeping again (0, the default: always sleep on the kick eventfd).
    pub fn set_poll_us(&self, us: u64) {
        self.poll_us.store(us, Ordering::Relaxed);
    }

    fn frontend_memory(&self) -> MutexGuard<'_, FrontendMemory> {
        self.frontend_memory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn poll_us(&self) -> u64 {
        self.poll_us.load(Ordering::Relaxed)
    }

    /// Virtio features offered to the frontend.
    fn features(&self) -> u64 {
        self.cfg.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
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

    /// Request counters of this device.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The device configuration.
    pub fn config(&self) -> &BlkConfig {
        &self.cfg
    }

    /// Stop taking requests, complete everything in flight, and flush the backend. The queues
    /// stay locked (no new request starts) until the returned guard is dropped; a daemon that
    /// is exiting simply exits while holding it.
    pub fn quiesce(&self) -> (Quiesced<'_>, std::io::Result<()>) {
        let mut guards = Vec::new();
        for q in &self.queues {
            let mut g = lock(q);
            g.drain();
            guards.push(g);
        }
        let flushed = self.backend.flush();
        (Quiesced { _guards: guards }, flushed)
    }

    /// Serve frontends on `listener`, one after the other, until `stop` is set (checked
    /// between connections) or an error occurs.
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
            match QueueThread::spawn(q.clone(), self.poll_us.clone()) {
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
                Ok(()) => {}
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

/// Remove the socket file when dropped.
pub struct SocketGuard(pub PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Whether a frontend could reach `path` (used by tests and the CLI).
pub fn socket_in_use(path: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}
