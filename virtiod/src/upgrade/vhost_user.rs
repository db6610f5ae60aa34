//! A vhost-user device served on its listening socket in a thread of its own (the
//! transport's [`Server`]), which an upgrade can hand over to a new process with its frontend
//! still connected.
//!
//! The old process freezes the connection between two frontend messages
//! ([`VuServer::export`]: requests in flight complete, the backend is flushed), sends its
//! state and descriptors, and lets go of it ([`VuServer::commit`]) only once the new process
//! imported it ([`VuServer::import`]); that one serves it ([`VuServer::serve_imported`]) only
//! after the commit, so the two never both read the frontend's socket. Before the commit the
//! old process can serve on exactly as before ([`VuServer::resume`]). A device without a
//! frontend hands over its listening socket the same way.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use virtiod_core::{Device as CoreDevice, DeviceError};
use virtiod_vhost_user::{
    Error, Export, HandoverError, HandoverState, Imported, Server, VhostUserDevice,
};

/// Called in the serving thread when serving ended by itself (not through a stop, nor after
/// a hand-over).
pub type OnExit = Arc<dyn Fn(Result<(), Error>) + Send + Sync>;

/// A vhost-user device serving frontends on its socket, or taken over and about to.
pub struct VuServer {
    /// The virtio device, to serve it afresh if the new process fails after the commit.
    core: Arc<dyn CoreDevice>,
    max_poll: Duration,
    dev: Arc<VhostUserDevice>,
    /// This process's copy of the listening socket (the serving thread has its own).
    listener: UnixListener,
    socket: PathBuf,
    name: String,
    on_exit: OnExit,
    /// The serving thread (none while an imported connection waits for the commit).
    server: Option<Server>,
    /// Taken over, not served yet (the new process of an upgrade).
    imported: Option<Box<Imported>>,
    /// Frozen for a hand-over (the old process of an upgrade).
    export: Option<Box<Export>>,
}

impl VuServer {
    /// Serve `core` on `listener` (bound at `socket`) in a thread named `name`, each queue
    /// polling for at most `max_poll`.
    pub fn spawn(
        core: Arc<dyn CoreDevice>,
        max_poll: Duration,
        listener: UnixListener,
        socket: &Path,
        name: &str,
        on_exit: OnExit,
    ) -> anyhow::Result<Self> {
        let dev = VhostUserDevice::new(core.clone(), max_poll)?;
        let mut this = Self {
            core,
            max_poll,
            dev,
            listener,
            socket: socket.to_path_buf(),
            name: name.to_string(),
            on_exit,
            server: None,
            imported: None,
            export: None,
        };
        this.start()?;
        Ok(this)
    }

    /// Take over what another process exported (its `state` and the descriptors `fds` it
    /// names), without serving it yet: see [`Self::serve_imported`].
    pub fn import(
        core: Arc<dyn CoreDevice>,
        max_poll: Duration,
        state: &HandoverState,
        fds: Vec<OwnedFd>,
        socket: &Path,
        name: &str,
        on_exit: OnExit,
    ) -> anyhow::Result<Self> {
        let listener = fds
            .get(state.listener)
            .context("the hand-over has no listening socket")?
            .try_clone()
            .context("duplicating the listening socket handed over")?;
        let dev = VhostUserDevice::new(core.clone(), max_poll)?;
        let imported = dev.import(state, fds)?;
        Ok(Self {
            core,
            max_poll,
            dev,
            listener: UnixListener::from(listener),
            socket: socket.to_path_buf(),
            name: name.to_string(),
            on_exit,
            server: None,
            imported: Some(Box::new(imported)),
            export: None,
        })
    }

    /// Serve what [`Self::import`] took over: only once the old process let go of it.
    pub fn serve_imported(&mut self) -> std::io::Result<()> {
        if let Some(imported) = self.imported.take() {
            let on_exit = self.on_exit.clone();
            self.server =
                Some(
                    self.dev
                        .spawn_imported(*imported, &self.socket, &self.name, move |r| on_exit(r))?,
                );
        }
        Ok(())
    }

    fn start(&mut self) -> anyhow::Result<()> {
        let listener = self
            .listener
            .try_clone()
            .context("duplicating the listening socket")?;
        let on_exit = self.on_exit.clone();
        let server = self
            .dev
            .spawn(listener, &self.socket, &self.name, move |r| on_exit(r))
            .context("cannot start a vhost-user thread")?;
        self.server = Some(server);
        Ok(())
    }

    /// Whether it serves (or will, once an imported connection is committed).
    pub fn is_serving(&self) -> bool {
        self.imported.is_some() || self.server.as_ref().is_some_and(Server::is_serving)
    }

    /// Freeze the device for a hand-over (see the module): requests in flight complete, the
    /// backend is flushed, nothing is served until [`Self::commit`] or [`Self::resume`].
    pub fn export(&mut self, timeout: Duration) -> Result<(), HandoverError> {
        if self.export.is_none() {
            self.export = Some(Box::new(self.dev.export(timeout)?));
        }
        Ok(())
    }

    /// The state and descriptors to hand over, once exported.
    pub fn handover(&self) -> Option<(&HandoverState, Vec<BorrowedFd<'_>>)> {
        let export = self.export.as_ref()?;
        Some((
            export.state(),
            export.fds().iter().map(AsFd::as_fd).collect(),
        ))
    }

    /// The new process imported the export: let go of the connection and the socket (the
    /// frontend is not told). Waits at most `timeout` for the serving thread.
    pub fn commit(&mut self, timeout: Duration) -> Result<(), HandoverError> {
        match self.export.take() {
            Some(export) => export.commit(timeout),
            None => Ok(()),
        }
    }

    /// Serve on after a failed hand-over: exactly as before if it was not committed;
    /// otherwise (the new process failed after the commit, the connection died with it) the
    /// socket afresh, for the frontend to reconnect to.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        if let Some(export) = self.export.take() {
            export.resume();
            return Ok(());
        }
        if self.dev.handed_over() {
            tracing::warn!(
                socket = %self.socket.display(),
                "the new process failed after taking the connection over: serving the socket \
                 again, the frontend has to reconnect"
            );
            if let Some(old) = self.server.take() {
                let _ = old.stop(Duration::ZERO);
            }
            self.dev = VhostUserDevice::new(self.core.clone(), self.max_poll)?;
            self.start()?;
        }
        Ok(())
    }

    /// Stop serving and remove the socket: what the frontend has in flight completes, it is
    /// disconnected and the device stopped (virtio-blk: the final flush).
    pub fn stop(mut self, timeout: Duration) -> Result<(), DeviceError> {
        if let Some(export) = self.export.take() {
            export.resume();
        }
        match self.server.take() {
            Some(server) => server.stop(timeout),
            None => {
                // Imported but never served: nothing ran here.
                let _ = std::fs::remove_file(&self.socket);
                Ok(())
            }
        }
    }
}
