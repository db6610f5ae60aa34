//! vhost-user-blk transport: serves a virtio-blk engine to a vhost-user frontend (QEMU,
//! cloud-hypervisor, libblkio) over a unix socket.
//!
//! `vhost-user-backend` runs one epoll thread per queue; each thread owns one
//! [`QueueWorker`] (and with it one backend I/O context, e.g. one `io_uring`), so queues
//! never share a lock on the hot path. After a frontend disconnects, in-flight requests are
//! drained and the daemon waits for the next frontend on the same socket.

mod socket;

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{
    ShutdownHandle, VhostUserBackend, VhostUserDaemon, VringMutex, VringState, VringT,
};
use virtio_queue::QueueT;
use virtiod_backend::Backend;
use virtiod_blk::{BlkConfig, Poll, QueueWorker, Stats};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

pub use socket::bind_socket;

type Mem = GuestMemoryMmap<()>;
type AtomicMem = GuestMemoryAtomic<Mem>;
type Vring = VringMutex<AtomicMem>;

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
    /// The vhost-user library failed.
    #[error("vhost-user: {0}")]
    Daemon(String),
}

/// Per-queue state (internal): the worker and, while a frontend is connected, its vring and memory.
pub struct QueueState {
    worker: QueueWorker<Mem>,
    vring: Option<Vring>,
    mem: Option<AtomicMem>,
}

impl QueueState {
    /// Complete every in-flight request into the used ring (if the vring is still known).
    fn drain(&mut self) {
        let (Some(vring), Some(mem)) = (self.vring.as_ref(), self.mem.as_ref()) else {
            return;
        };
        let mem = mem.memory().into_inner();
        let mut state = vring.get_mut();
        match self.worker.drain(state.get_queue_mut(), mem.as_ref()) {
            Ok(true) => {
                let _ = state.signal_used_queue();
            }
            Ok(false) => {}
            Err(err) => tracing::warn!(%err, "draining a queue failed"),
        }
    }
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
    queues: Vec<Mutex<QueueState>>,
    event_idx: AtomicBool,
    poll_us: AtomicU64,
    /// Cuts the current frontend's connection (while one is connected).
    connection: Mutex<Option<ShutdownHandle>>,
}

/// Event id of a queue thread's backend completion fd (above the ids the library reserves).
fn completion_event(num_queues: usize) -> u16 {
    num_queues as u16 + 1
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
                Ok(Mutex::new(QueueState {
                    worker,
                    vring: None,
                    mem: None,
                }))
            })
            .collect::<Result<_, Error>>()?;
        Ok(Arc::new(Self {
            cfg,
            backend,
            stats,
            queues,
            event_idx: AtomicBool::new(false),
            poll_us: AtomicU64::new(0),
            connection: Mutex::new(None),
        }))
    }

    /// Busy-poll each queue for up to `us` microseconds after the last request before
    /// sleeping again (0, the default: always sleep on the kick eventfd).
    pub fn set_poll_us(&self, us: u64) {
        self.poll_us.store(us, Ordering::Relaxed);
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
            conn.shutdown();
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

    fn lock(&self, queue: usize) -> MutexGuard<'_, QueueState> {
        self.queues[queue].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stop taking requests, complete everything in flight, and flush the backend. The queues
    /// stay locked (no new request starts) until the returned guard is dropped; a daemon that
    /// is exiting simply exits while holding it.
    pub fn quiesce(&self) -> (Quiesced<'_>, std::io::Result<()>) {
        let mut guards = Vec::new();
        for q in 0..self.queues.len() {
            let mut g = self.lock(q);
            g.drain();
            guards.push(g);
        }
        let flushed = self.backend.flush();
        (Quiesced { _guards: guards }, flushed)
    }

    /// Serve frontends on `listener`, one after the other, until `stop` is set (checked
    /// between connections) or an error occurs.
    pub fn serve(self: &Arc<Self>, listener: UnixListener, stop: &AtomicBool) -> Result<(), Error> {
        let mut listener = Listener::from(listener);
        while !stop.load(Ordering::Acquire) {
            let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
            let mut daemon = VhostUserDaemon::new("virtiod-vhost-user".into(), self.clone(), mem)
                .map_err(|e| Error::Daemon(e.to_string()))?;
            daemon
                .start(&mut listener)
                .map_err(|e| Error::Daemon(format!("accepting a frontend: {e}")))?;
            tracing::info!("frontend connected");
            *self.connection.lock().unwrap_or_else(|e| e.into_inner()) = daemon.shutdown_handle();
            let handlers = daemon.get_epoll_handlers();
            for (queue, handler) in handlers.iter().enumerate() {
                if let Some(fd) = self.lock(queue).worker.completion_fd() {
                    handler
                        .register_listener(
                            fd,
                            EventSet::IN,
                            u64::from(completion_event(self.queues.len())),
                        )
                        .map_err(|e| Error::Daemon(format!("registering completions: {e}")))?;
                }
            }
            let result = daemon.wait();
            self.connection
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            tracing::info!(?result, "frontend disconnected");
            for queue in 0..self.queues.len() {
                let mut q = self.lock(queue);
                q.drain();
                q.vring = None;
                q.mem = None;
            }
            for handler in &handlers {
                handler.send_exit_event();
            }
        }
        Ok(())
    }

    fn handle_queue_event(
        &self,
        device_event: u16,
        vring: &Vring,
        queue: usize,
    ) -> std::io::Result<()> {
        let mut guard = self.lock(queue);
        let q = &mut *guard;
        if q.vring.is_none() {
            q.vring = Some(vring.clone());
        }
        let Some(mem) = q.mem.as_ref().map(|m| m.memory().into_inner()) else {
            return Ok(());
        };
        let mut state = vring.get_mut();
        let notify =
            Self::run(&mut q.worker, &mut state, &mem, device_event == 0).map_err(|err| {
                // Returning the error ends this queue's thread: say so, or the queue just
                // goes silent.
                tracing::error!(queue, %err, "queue stopped until the frontend reconnects");
                std::io::Error::other(err.to_string())
            })?;
        if notify {
            state.signal_used_queue()?;
        }
        let budget = Duration::from_micros(self.poll_us.load(Ordering::Relaxed));
        if budget.is_zero() || !(state.get_queue().ready() && state.is_enabled()) {
            return Ok(());
        }
        // Busy-poll: keep serving without sleeping while requests keep coming.
        let mut poll = Poll::new(budget);
        let mut mem = mem;
        loop {
            match q
                .worker
                .poll_step(&mut poll, state.get_queue_mut(), &mut mem, &mut || None)
            {
                Ok(Some(true)) => state.signal_used_queue()?,
                Ok(Some(false)) => {}
                Ok(None) => return Ok(()),
                Err(err) => {
                    tracing::error!(queue, %err, "queue stopped until the frontend reconnects");
                    return Err(std::io::Error::other(err.to_string()));
                }
            }
        }
    }

    fn run(
        worker: &mut QueueWorker<Mem>,
        state: &mut VringState<AtomicMem>,
        mem: &Arc<Mem>,
        kick: bool,
    ) -> Result<bool, virtiod_blk::WorkerError> {
        let mut notify = false;
        if !kick {
            worker.ack_completion_event();
            notify |= worker.process_completions(state.get_queue_mut(), mem.as_ref())?;
        }
        if state.get_queue().ready() && state.is_enabled() {
            notify |= worker.process_queue(state.get_queue_mut(), mem)?;
        }
        Ok(notify)
    }
}

impl VhostUserBackend for VhostUserBlk {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.queues.len()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.cfg.queue_size)
    }

    fn features(&self) -> u64 {
        self.cfg.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.cfg.read_config(offset, size)
    }

    fn update_memory(&self, mem: AtomicMem) -> std::io::Result<()> {
        for queue in 0..self.queues.len() {
            self.lock(queue).mem = Some(mem.clone());
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.queues.len()).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        if let Some(q) = self.queues.get(queue_index as usize) {
            q.lock().unwrap_or_else(|e| e.into_inner()).drain();
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> std::io::Result<()> {
        if evset != EventSet::IN {
            return Err(std::io::Error::other(format!(
                "unexpected event set {evset:?}"
            )));
        }
        let Some(vring) = vrings.first() else {
            return Ok(());
        };
        if device_event != 0 && device_event != completion_event(self.queues.len()) {
            return Ok(());
        }
        self.handle_queue_event(device_event, vring, thread_id)
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
