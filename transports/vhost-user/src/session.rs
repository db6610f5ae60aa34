//! Serving the listening socket and one frontend connection at a time: the accept loop, the
//! message loop (relay → `vhost` request handler), and what is torn down when a frontend
//! goes (or is handed over to another process, `handover.rs`).

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::{BackendReqHandler, Error as VuError};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend_channel::BackendChannel;
use crate::handler::Connection;
use crate::handover::Decision;
use crate::queue::{lock, QueueThread};
use crate::wire::{Wire, WireError};
use crate::{Error, VhostUserDevice};

const TOKEN_LISTENER: u64 = 0;
const TOKEN_HANDOVER: u64 = 1;

/// One frontend connection: the relay reading its socket, the `vhost` crate's request
/// handler, and our handler's state.
pub(crate) struct Session {
    pub wire: Wire,
    pub requests: BackendReqHandler<Mutex<Connection>>,
    pub conn: Arc<Mutex<Connection>>,
    /// Taken over from another process: the queues get their memory (and the started ones
    /// are served) only when serving begins, so nothing touches the rings before.
    pub imported: bool,
}

impl Session {
    /// A fresh connection on `stream`.
    pub fn new(dev: &Arc<VhostUserDevice>, stream: UnixStream) -> std::io::Result<Self> {
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let (wire, handler_end) = Wire::new(stream, wake.clone(), Some(dev.handover_wake.clone()))?;
        let conn = Arc::new(Mutex::new(Connection::new(dev.clone(), wake)));
        let requests = BackendReqHandler::from_stream(handler_end, conn.clone());
        Ok(Self {
            wire,
            requests,
            conn,
            imported: false,
        })
    }

    pub fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How serving a connection ended.
enum Ended {
    /// The frontend went (or broke the protocol): its state was forgotten.
    Gone(Result<(), VuError>),
    /// It was handed over; the sender is told once this process let go of it.
    HandedOver(Sender<()>),
}

impl VhostUserDevice {
    /// Serve `session` first if there is one (taken over from another process), then the
    /// frontends that connect to `listener`, one after the other.
    pub(crate) fn serve_from(
        self: &Arc<Self>,
        listener: UnixListener,
        mut session: Option<Session>,
        stop: &AtomicBool,
    ) -> Result<(), Error> {
        let waiter = accept_waiter(&listener, &self.handover_wake)
            .map_err(|e| Error::Daemon(format!("waiting for frontends: {e}")))?;
        loop {
            if let Some(s) = session.take() {
                match self.serve_connection(s, &listener) {
                    Ended::Gone(result) => tracing::info!(?result, "frontend disconnected"),
                    Ended::HandedOver(done) => {
                        let _ = done.send(());
                        return Ok(());
                    }
                }
            }
            if stop.load(Ordering::Acquire) {
                return Ok(());
            }
            let mut events = [EpollEvent::default(); 2];
            let n = match waiter.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::Daemon(format!("waiting for frontends: {e}"))),
            };
            if events[..n].iter().any(|e| e.data() == TOKEN_HANDOVER) {
                let _ = self.handover_wake.read();
                if let Decision::Commit(done) = self.freeze(None, &mut Vec::new(), &listener) {
                    self.handed_over.store(true, Ordering::Release);
                    let _ = done.send(());
                    return Ok(());
                }
                continue;
            }
            if n == 0 {
                continue;
            }
            let (stream, _) = listener
                .accept()
                .map_err(|e| Error::Daemon(format!("accepting a frontend: {e}")))?;
            if stop.load(Ordering::Acquire) {
                return Ok(());
            }
            self.accepted.fetch_add(1, Ordering::Relaxed);
            tracing::info!("frontend connected");
            match Session::new(self, stream) {
                Ok(s) => session = Some(s),
                Err(err) => tracing::error!(%err, "cannot serve the frontend; closing it"),
            }
        }
    }

    /// Start one thread per queue into `threads`.
    pub(crate) fn start_queue_threads(
        &self,
        threads: &mut Vec<QueueThread>,
    ) -> Result<(), std::io::Error> {
        for q in &self.queues {
            match QueueThread::spawn(q.clone()) {
                Ok(t) => threads.push(t),
                Err(err) => {
                    tracing::error!(%err, "cannot start a queue thread");
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    /// Serve one frontend until it disconnects (or breaks the protocol), then complete what it
    /// left in flight and forget its set-up; or until it is handed over, then forget it
    /// without touching its rings.
    fn serve_connection(self: &Arc<Self>, mut session: Session, listener: &UnixListener) -> Ended {
        *self.connection.lock().unwrap_or_else(|e| e.into_inner()) =
            session.wire.frontend().try_clone().ok();
        let mut threads = Vec::with_capacity(self.queues.len());
        let mut ended = match self.start_queue_threads(&mut threads) {
            Ok(()) => None,
            Err(err) => Some(Ended::Gone(Err(VuError::ReqHandlerError(err)))),
        };
        if ended.is_none() {
            if session.imported {
                session.conn().start_queues();
            }
            ended = Some(self.handle_messages(&mut session, &mut threads, listener));
        }
        let ended = ended.unwrap_or(Ended::Gone(Ok(())));
        let handed_over = matches!(ended, Ended::HandedOver(_));
        // Forget the socket without shutting it down: after a handover another process
        // serves it.
        self.connection
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        self.backend_channel().take();
        if handed_over {
            self.handed_over.store(true, Ordering::Release);
        }
        for q in &self.queues {
            let mut st = lock(q);
            if !handed_over {
                // Handed over: already drained, and the rings are the other process's now.
                st.drain();
            }
            st.reset();
        }
        for t in threads {
            t.stop();
        }
        // Nothing refers to the frontend's memory any more: unmap it.
        drop(session);
        self.frontend_memory().release_unused();
        ended
    }

    /// Handle the frontend's messages until it disconnects, breaks the protocol, shrinks the
    /// memory it shared, or is handed over.
    fn handle_messages(
        self: &Arc<Self>,
        s: &mut Session,
        threads: &mut Vec<QueueThread>,
        listener: &UnixListener,
    ) -> Ended {
        let gone = |e: String| Ended::Gone(Err(VuError::ReqHandlerError(std::io::Error::other(e))));
        loop {
            match s.wire.forward_request() {
                Ok(true) => {}
                Ok(false) => continue, // answered by the wire itself
                Err(WireError::Disconnected) => return Ended::Gone(Ok(())),
                Err(WireError::Handover) => match self.freeze(Some(s), threads, listener) {
                    Decision::Commit(done) => return Ended::HandedOver(done),
                    Decision::Resume => continue,
                    Decision::Fail(err) => return gone(err),
                },
                Err(WireError::MemoryShrunk) => {
                    self.report_shrunk(&s.conn);
                    return gone(WireError::MemoryShrunk.to_string());
                }
                Err(err) => {
                    tracing::warn!(%err, "reading a vhost-user message failed; closing the connection");
                    return gone(err.to_string());
                }
            }
            let handled = s.requests.handle_request();
            let replied = s.wire.forward_replies();
            if let Some(sock) = s.wire.take_backend_channel() {
                if handled.is_ok() {
                    let acked = s.conn().acked_protocol();
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
                Err(VuError::Disconnected | VuError::PartialMessage) => return Ended::Gone(Ok(())),
                Err(err) => {
                    tracing::warn!(%err, "vhost-user request failed; closing the connection");
                    return Ended::Gone(Err(err));
                }
            }
            if let Err(err) = replied {
                return Ended::Gone(Err(VuError::ReqHandlerError(err)));
            }
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

/// An epoll set of the listening socket and the handover eventfd.
fn accept_waiter(listener: &UnixListener, handover: &EventFd) -> std::io::Result<Epoll> {
    let epoll = Epoll::new()?;
    for (fd, token) in [
        (listener.as_raw_fd(), TOKEN_LISTENER),
        (handover.as_raw_fd(), TOKEN_HANDOVER),
    ] {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )?;
    }
    Ok(epoll)
}
