//! Handing a live connection over to another process (upgrade in place): the serving thread
//! stops between two messages, the queues are drained and their threads stopped, and the
//! connection's state ([`HandoverState`]) and file descriptors are exported; the new process
//! imports them ([`VhostUserDevice::import`]) and serves the same frontend on, which
//! notices nothing. If the new process fails, [`Export::resume`] (or dropping the
//! [`Export`]) lets the old one continue exactly as before.
//!
//! The state names its descriptors by index into the list handed over with it. Everything
//! the frontend set up is in it: features, memory table, rings and their positions, eventfds,
//! the in-flight region, the backend channel, what the relay and the `vhost` crate's handler
//! remember, and the listening socket. Device state (virtio-blk: none besides its backend;
//! the configuration space) is the device's: the new process builds the same device from
//! the same specification.

mod import;

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use virtiod_core::{DeviceError, Event};

use crate::inflight::Layout;
use crate::queue::{lock, QueueThread, RingState};
use crate::session::Session;
use crate::wire::WireState;
use crate::VhostUserDevice;

pub use import::Imported;

/// Version of [`HandoverState`]; an importer refuses any other.
pub const HANDOVER_VERSION: u32 = 1;

/// Why a handover failed. The exporting process serves on in every case.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// An export of this device is already under way.
    #[error("an export of this device is already under way: resume or commit it first")]
    Busy,
    /// The serving thread did not stop in time.
    #[error("the vhost-user thread did not stop between two messages within {0:?} (a message is being received or handled, or the device is not served): try again")]
    Timeout(Duration),
    /// The device was handed over already.
    #[error("the device was handed over already: it serves nothing")]
    HandedOver,
    /// Stopping the device (virtio-blk: the flush) failed; the old process serves on.
    #[error("stopping the device for the handover failed: {0}; it keeps serving")]
    Device(#[from] DeviceError),
    /// A system call failed (duplicating a descriptor, mapping memory, ...).
    #[error("{what}: {err}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        err: std::io::Error,
    },
    /// The state was written by another version.
    #[error("handover state version {found}, this build reads version {HANDOVER_VERSION}: upgrade between compatible builds")]
    Version {
        /// The version found.
        found: u32,
    },
    /// The state names a descriptor that was not handed over (or names one twice).
    #[error("the handover state names descriptor {index} for {what}, which was not handed over (or is named twice)")]
    MissingFd {
        /// The index.
        index: usize,
        /// What it was for.
        what: String,
    },
    /// The state does not fit this device or is inconsistent.
    #[error("the handover state does not fit this device: {0} (was it built from the same specification?)")]
    Mismatch(String),
    /// A memory region could not be mapped again.
    #[error("memory region {index} of the handover state: {reason}")]
    Region {
        /// The region's index in the state.
        index: usize,
        /// Why.
        reason: String,
    },
    /// The device's serving thread is gone: the export cannot be settled.
    #[error("the vhost-user thread of the device is gone: it serves nothing")]
    ThreadGone,
}

impl HandoverError {
    pub(crate) fn io(what: impl Into<String>, err: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            err,
        }
    }
}

/// Everything a new process needs to serve on a device's socket and connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HandoverState {
    /// [`HANDOVER_VERSION`].
    pub version: u32,
    /// Descriptor of the listening socket.
    pub listener: usize,
    /// The frontend connected now, if any.
    pub connection: Option<ConnectionState>,
}

/// One frontend connection's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionState {
    /// Descriptor of the connection's socket (always the first one handed over).
    pub socket: usize,
    /// The frontend read the features (`GET_FEATURES`).
    pub features_read: bool,
    /// Virtio features the frontend acknowledged (`SET_FEATURES`), if it did.
    pub acked_features: Option<u64>,
    /// Protocol features it acknowledged (`SET_PROTOCOL_FEATURES`), if it did.
    pub acked_protocol: Option<u64>,
    /// `SET_OWNER` was received.
    pub owner: bool,
    /// What the message relay remembers.
    pub wire: WireState,
    /// The memory table, in the order the frontend gave it.
    pub regions: Vec<RegionState>,
    /// The in-flight region, if one was negotiated.
    pub inflight: Option<InflightState>,
    /// Descriptor of the backend channel (`SET_BACKEND_REQ_FD`), if given.
    pub backend_channel: Option<usize>,
    /// The rings, one per queue of the device.
    pub vrings: Vec<VringState>,
}

/// One region of the memory table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionState {
    /// Guest-physical address.
    pub guest_addr: u64,
    /// Bytes.
    pub size: u64,
    /// Address in the frontend's address space (ring addresses are given in it).
    pub user_addr: u64,
    /// Offset in the file.
    pub mmap_offset: u64,
    /// Descriptor of the file.
    pub fd: usize,
}

/// The in-flight region (its per-queue records live in the region itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InflightState {
    /// Descriptor of the file.
    pub fd: usize,
    /// Offset of the region in the file.
    pub mmap_offset: u64,
    /// Bytes of the region.
    pub mmap_size: u64,
    /// Queues it has a block for.
    pub num_queues: u16,
    /// Descriptors per queue.
    pub queue_size: u16,
}

/// One ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VringState {
    /// Queue index.
    pub index: u16,
    /// Set-up and position.
    pub ring: RingState,
    /// Descriptor of the kick eventfd, if set.
    pub kick: Option<usize>,
    /// Descriptor of the call eventfd, if set.
    pub call: Option<usize>,
    /// Descriptor of the error eventfd, if set.
    pub err: Option<usize>,
}

/// What the exporter decides, told to the frozen serving thread.
pub(crate) enum Decision {
    /// Let go: the sender is told once nothing of the connection is left here.
    Commit(Sender<()>),
    /// Serve on.
    Resume,
    /// Serving cannot go on (the queue threads did not start again): close the connection.
    Fail(String),
}

/// An export asked for, waiting for the serving thread.
pub(crate) struct Request {
    reply: Sender<Result<(HandoverState, Vec<OwnedFd>), HandoverError>>,
    decision: Receiver<Decision>,
}

/// A frozen connection, exported: nothing is served until [`Self::commit`] (the other
/// process serves it from now on) or [`Self::resume`] (this one serves on). Dropping it
/// resumes. Settle it before stopping the device's [`crate::Server`]: the serving thread
/// waits for the decision.
pub struct Export {
    state: HandoverState,
    fds: Vec<OwnedFd>,
    decision: Sender<Decision>,
}

impl Export {
    /// The state to hand over.
    pub fn state(&self) -> &HandoverState {
        &self.state
    }

    /// The descriptors the state names (duplicates; the connection's socket first when
    /// there is one), to send with it.
    pub fn fds(&self) -> &[OwnedFd] {
        &self.fds
    }

    /// Take the descriptors (to import in this same process).
    pub fn take_fds(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.fds)
    }

    /// The other process serves the connection from now on: this one lets go of it, of its
    /// memory and of the listening socket without telling the frontend, and its serving
    /// thread ends. Waits at most `timeout` for that.
    pub fn commit(self, timeout: Duration) -> Result<(), HandoverError> {
        let (done, wait) = mpsc::channel();
        self.decision
            .send(Decision::Commit(done))
            .map_err(|_| HandoverError::ThreadGone)?;
        wait.recv_timeout(timeout)
            .map_err(|_| HandoverError::Timeout(timeout))
    }

    /// Serve on in this process, exactly as before the export.
    pub fn resume(self) {
        let _ = self.decision.send(Decision::Resume);
    }
}

impl VhostUserDevice {
    /// Freeze the device's serving thread between two frontend messages (a message being
    /// received or handled is finished first; one not yet read stays in the socket for
    /// whoever serves next), complete every request in flight, stop the queue threads
    /// (nothing is reset) and the device ([`virtiod_core::Device::stop`], the flush), and
    /// export the connection and the listening socket. Waits at most `timeout` for the
    /// serving thread.
    ///
    /// Call it instead of [`Self::quiesce`], never while holding a [`crate::Quiesced`].
    pub fn export(&self, timeout: Duration) -> Result<Export, HandoverError> {
        if self.handed_over() {
            return Err(HandoverError::HandedOver);
        }
        let (reply, replies) = mpsc::channel();
        let (decide, decision) = mpsc::channel();
        {
            let mut slot = self.handover.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_some() {
                return Err(HandoverError::Busy);
            }
            *slot = Some(Request { reply, decision });
        }
        self.handover_wake
            .write(1)
            .map_err(|e| HandoverError::io("waking the vhost-user thread", e))?;
        match replies.recv_timeout(timeout) {
            Ok(Ok((state, fds))) => Ok(Export {
                state,
                fds,
                decision: decide,
            }),
            Ok(Err(err)) => Err(err),
            Err(_) => {
                // Withdrawn if not taken yet; if taken, the thread finds nobody to answer
                // and serves on.
                self.handover
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                Err(HandoverError::Timeout(timeout))
            }
        }
    }

    /// In the serving thread, between two messages (or while waiting for a frontend when
    /// `session` is `None`): answer an export if one is asked for, then wait for the
    /// decision.
    pub(crate) fn freeze(
        self: &Arc<Self>,
        session: Option<&Session>,
        threads: &mut Vec<QueueThread>,
        listener: &UnixListener,
    ) -> Decision {
        let Some(request) = self
            .handover
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return Decision::Resume;
        };
        tracing::info!(
            connected = session.is_some(),
            "freezing the device for a handover"
        );
        for t in threads.drain(..) {
            t.stop();
        }
        for q in &self.queues {
            lock(q).drain();
        }
        let exported = self
            .device
            .stop()
            .map_err(HandoverError::from)
            .and_then(|()| self.snapshot(session, listener));
        let failed = exported.is_err();
        let decision = if request.reply.send(exported).is_err() || failed {
            Decision::Resume
        } else {
            request.decision.recv().unwrap_or(Decision::Resume)
        };
        match decision {
            Decision::Commit(done) => {
                tracing::info!("handed over: this process no longer serves the device");
                Decision::Commit(done)
            }
            _ => self.thaw(session.is_some(), threads),
        }
    }

    /// Serve on after an export that was not committed.
    fn thaw(&self, connected: bool, threads: &mut Vec<QueueThread>) -> Decision {
        tracing::info!("handover abandoned: serving on");
        if !connected {
            return Decision::Resume;
        }
        if let Err(err) = self.start_queue_threads(threads) {
            return Decision::Fail(format!("cannot restart a queue thread: {err}"));
        }
        // Serve what the driver queued meanwhile (its kicks wait in the eventfds anyway).
        for q in &self.queues {
            lock(q).service(Event::Kick);
        }
        Decision::Resume
    }

    /// The state and duplicated descriptors of the listener and of `session`.
    fn snapshot(
        &self,
        session: Option<&Session>,
        listener: &UnixListener,
    ) -> Result<(HandoverState, Vec<OwnedFd>), HandoverError> {
        let mut fds = Fds::default();
        let connection = session
            .map(|s| self.connection_state(s, &mut fds))
            .transpose()?;
        let listener = fds.dup(listener, "the listening socket")?;
        Ok((
            HandoverState {
                version: HANDOVER_VERSION,
                listener,
                connection,
            },
            fds.0,
        ))
    }

    fn connection_state(
        &self,
        s: &Session,
        fds: &mut Fds,
    ) -> Result<ConnectionState, HandoverError> {
        let socket = fds.dup(s.wire.frontend(), "the frontend's socket")?;
        let conn = s.conn();
        let memory = self.frontend_memory();
        let mut regions = Vec::with_capacity(conn.mappings.len());
        for m in &conn.mappings {
            let file = memory.file_of(&m.region).ok_or_else(|| {
                HandoverError::Mismatch("a memory region is not mapped by this device".into())
            })?;
            regions.push(RegionState {
                guest_addr: m.gpa,
                size: m.size,
                user_addr: m.frontend_va,
                mmap_offset: m.mmap_offset,
                fd: fds.dup(file, "a memory region")?,
            });
        }
        let inflight = match conn.inflight.as_ref() {
            None => None,
            Some(region) => {
                let (file, layout): (_, Layout) = region.shared();
                Some(InflightState {
                    fd: fds.dup(file, "the in-flight region")?,
                    mmap_offset: layout.offset,
                    mmap_size: layout.size,
                    num_queues: layout.num_queues,
                    queue_size: layout.queue_size,
                })
            }
        };
        let backend_channel = match self.backend_channel().as_ref() {
            None => None,
            Some(channel) => Some(fds.dup(channel.socket(), "the backend channel")?),
        };
        let mut vrings = Vec::with_capacity(self.queues.len());
        for (index, q) in self.queues.iter().enumerate() {
            let st = lock(q);
            let [kick, call, err] = st.fds();
            vrings.push(VringState {
                index: index as u16,
                ring: st.snapshot(),
                kick: kick.map(|f| fds.dup(f, "a kick eventfd")).transpose()?,
                call: call.map(|f| fds.dup(f, "a call eventfd")).transpose()?,
                err: err.map(|f| fds.dup(f, "an error eventfd")).transpose()?,
            });
        }
        Ok(ConnectionState {
            socket,
            features_read: conn.features_read,
            acked_features: conn.features_set.then_some(conn.acked_features),
            acked_protocol: conn.protocol_set.then_some(conn.acked_protocol),
            owner: conn.owner,
            wire: s.wire.state(),
            regions,
            inflight,
            backend_channel,
            vrings,
        })
    }
}

/// Descriptors collected for a handover, named by their index.
#[derive(Default)]
struct Fds(Vec<OwnedFd>);

impl Fds {
    fn dup(&mut self, fd: &impl std::os::fd::AsFd, what: &str) -> Result<usize, HandoverError> {
        let owned = fd
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| HandoverError::io(format!("duplicating {what}"), e))?;
        self.0.push(owned);
        Ok(self.0.len() - 1)
    }
}
