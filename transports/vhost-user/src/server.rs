//! A device served on a listening socket in a thread of its own, stopped cleanly.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtiod_core::DeviceError;

use crate::{Error, Imported, VhostUserDevice};

/// A [`VhostUserDevice`] serving frontends on its socket, one after the other, in a thread
/// of its own (see [`VhostUserDevice::spawn`]). If the serving thread ends by itself (not
/// through [`Server::stop`], nor after a handover), `on_exit` is told why.
pub struct Server {
    dev: Arc<VhostUserDevice>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    socket: PathBuf,
}

impl VhostUserDevice {
    /// Serve frontends on `listener` (bound at `socket`, see [`crate::bind_socket`]) in a new
    /// thread named `name`. If serving ends by itself (not through [`Server::stop`]),
    /// `on_exit` is called in that thread with the reason.
    pub fn spawn(
        self: &Arc<Self>,
        listener: UnixListener,
        socket: &Path,
        name: &str,
        on_exit: impl FnOnce(Result<(), Error>) + Send + 'static,
    ) -> std::io::Result<Server> {
        self.spawn_with(socket, name, on_exit, move |dev, stop| {
            dev.serve(listener, stop)
        })
    }

    /// Like [`Self::spawn`], for a connection and listening socket taken over from another
    /// process ([`Self::import`]): serves it first, then the frontends that connect. Only
    /// once the exporting process committed (see [`Self::serve_imported`]).
    pub fn spawn_imported(
        self: &Arc<Self>,
        imported: Imported,
        socket: &Path,
        name: &str,
        on_exit: impl FnOnce(Result<(), Error>) + Send + 'static,
    ) -> std::io::Result<Server> {
        self.spawn_with(socket, name, on_exit, move |dev, stop| {
            dev.serve_imported(imported, stop)
        })
    }

    fn spawn_with(
        self: &Arc<Self>,
        socket: &Path,
        name: &str,
        on_exit: impl FnOnce(Result<(), Error>) + Send + 'static,
        serve: impl FnOnce(&Arc<Self>, &AtomicBool) -> Result<(), Error> + Send + 'static,
    ) -> std::io::Result<Server> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (dev, stop) = (self.clone(), stop.clone());
            std::thread::Builder::new()
                .name(name.to_string())
                .spawn(move || {
                    virtiod_core::confine::enter(virtiod_core::confine::ThreadRole::Message);
                    let result = serve(&dev, &stop);
                    if !stop.load(Ordering::Acquire) && !dev.handed_over() {
                        on_exit(result);
                    }
                })?
        };
        Ok(Server {
            dev: self.clone(),
            stop,
            thread: Some(thread),
            socket: socket.to_path_buf(),
        })
    }
}

impl Server {
    /// The device served.
    pub fn device(&self) -> &Arc<VhostUserDevice> {
        &self.dev
    }

    /// Whether the serving thread still runs.
    pub fn is_serving(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stop serving: complete what the frontend has in flight while it is still connected,
    /// cut it off with the queues locked (nothing new starts), let the serving thread end
    /// (waiting at most `timeout`), stop the device ([`virtiod_core::Device::stop`], e.g. the
    /// final flush) and remove the socket. Returns the device's stop result.
    ///
    /// After a handover ([`crate::Export::commit`]) the socket and the frontend are another
    /// process's: they are left alone, only the serving thread is joined.
    pub fn stop(mut self, timeout: Duration) -> Result<(), DeviceError> {
        self.stop.store(true, Ordering::Release);
        if self.dev.handed_over() {
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
            return Ok(());
        }
        let (quiesced, first) = self.dev.quiesce();
        self.dev.disconnect();
        drop(quiesced);
        // Wake a server waiting in accept(): it takes this connection, sees `stop`, returns.
        let _ = UnixStream::connect(&self.socket);
        if let Some(thread) = self.thread.take() {
            let deadline = Instant::now() + timeout;
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if thread.is_finished() {
                let _ = thread.join();
            } else {
                tracing::warn!(socket = %self.socket.display(), "the vhost-user thread did not stop; leaving it");
            }
        }
        // Anything the frontend slipped in between: complete it and stop the device again.
        let (_quiesced, second) = self.dev.quiesce();
        if let Err(err) = std::fs::remove_file(&self.socket) {
            tracing::warn!(socket = %self.socket.display(), %err, "cannot remove the socket");
        }
        first.and(second)
    }
}
