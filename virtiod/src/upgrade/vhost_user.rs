//! A vhost-user device served on its listening socket in a thread of its own, which can stop
//! serving *without* giving up the socket: for an upgrade the listener goes to the new
//! process (there is never a moment without one), and if the new process fails it is served
//! here again.
//!
//! Interim behaviour until the transport can export a connected frontend's state: the
//! frontend is disconnected after its requests in flight completed, and reconnects (to the
//! new process) with its in-flight region, as after a restart.

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtiod_core::DeviceError;
use virtiod_vhost_user::{Error, VhostUserDevice};

/// Called in the serving thread when serving ended by itself (not through a stop).
pub type OnExit = Arc<dyn Fn(Result<(), Error>) + Send + Sync>;

/// A [`VhostUserDevice`] serving frontends on its socket.
pub struct VuServer {
    dev: Arc<VhostUserDevice>,
    /// This process's copy of the listener (the thread serves a clone).
    listener: UnixListener,
    socket: PathBuf,
    name: String,
    on_exit: OnExit,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl VuServer {
    /// Serve `dev` on `listener` (bound at `socket`) in a thread named `name`.
    pub fn spawn(
        dev: Arc<VhostUserDevice>,
        listener: UnixListener,
        socket: &Path,
        name: &str,
        on_exit: OnExit,
    ) -> std::io::Result<Self> {
        let mut this = Self {
            dev,
            listener,
            socket: socket.to_path_buf(),
            name: name.to_string(),
            on_exit,
            stop: Arc::new(AtomicBool::new(false)),
            thread: None,
        };
        this.start_thread()?;
        Ok(this)
    }

    fn start_thread(&mut self) -> std::io::Result<()> {
        let listener = self.listener.try_clone()?;
        let stop = Arc::new(AtomicBool::new(false));
        let (dev, flag, on_exit) = (self.dev.clone(), stop.clone(), self.on_exit.clone());
        let thread = std::thread::Builder::new()
            .name(self.name.clone())
            .spawn(move || {
                virtiod_core::confine::enter(virtiod_core::confine::ThreadRole::Message);
                let result = dev.serve(listener, &flag);
                if !flag.load(Ordering::Acquire) {
                    on_exit(result);
                }
            })?;
        self.stop = stop;
        self.thread = Some(thread);
        Ok(())
    }

    /// Whether the serving thread runs.
    pub fn is_serving(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stop the serving thread, keeping the socket: complete what the frontend has in flight
    /// while it is still connected, cut it off with the queues locked, wake a thread waiting
    /// in accept() (this process is the only one accepting on the socket here), wait for it
    /// (at most `timeout`) and stop the device (virtio-blk: flush).
    fn halt(&mut self, timeout: Duration) -> Result<(), DeviceError> {
        self.stop.store(true, Ordering::Release);
        let (quiesced, first) = self.dev.quiesce();
        self.dev.disconnect();
        drop(quiesced);
        if let Some(thread) = self.thread.take() {
            // A thread in accept() takes this connection, sees `stop` and returns; a thread
            // serving the frontend returns when it sees the disconnect.
            let _wake = UnixStream::connect(&self.socket);
            let deadline = Instant::now() + timeout;
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            if thread.is_finished() {
                let _ = thread.join();
            } else {
                tracing::warn!(socket = %self.socket.display(), "the vhost-user thread did not stop; leaving it");
            }
        }
        // Anything the frontend slipped in between: complete it and stop the device again.
        let (_quiesced, second) = self.dev.quiesce();
        first.and(second)
    }

    /// Stop serving and remove the socket (see [`Self::halt`]).
    pub fn stop(mut self, timeout: Duration) -> Result<(), DeviceError> {
        let result = self.halt(timeout);
        if let Err(err) = std::fs::remove_file(&self.socket) {
            tracing::warn!(socket = %self.socket.display(), %err, "cannot remove the socket");
        }
        result
    }

    /// Stop serving for a hand-over: the frontend is disconnected once its requests
    /// completed; the socket stays (see [`Self::listener_fd`]).
    pub fn quiesce(&mut self, timeout: Duration) -> Result<(), DeviceError> {
        self.halt(timeout)
    }

    /// Serve again after [`Self::quiesce`] (the hand-over failed).
    pub fn resume(&mut self) -> std::io::Result<()> {
        if self.thread.is_none() {
            self.start_thread()?;
        }
        Ok(())
    }

    /// The listening socket, to hand over.
    pub fn listener_fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }
}
