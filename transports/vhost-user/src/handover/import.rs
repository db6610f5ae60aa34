//! The importing side of a handover: map the frontend's memory again, bring the `vhost`
//! crate's handler and our own to the state of the connection, and restore the rings. Nothing
//! is served (no ring is touched) until the import is served ([`VhostUserDevice::serve_imported`]),
//! so the exporting process may still resume if this one gives up.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserMemoryRegion;
use virtio_queue::QueueT;
use vm_memory::{GuestMemoryMmap, GuestMemoryRegion};

use super::{ConnectionState, HandoverError, HandoverState, HANDOVER_VERSION};
use crate::backend_channel::BackendChannel;
use crate::inflight::InflightRegion;
use crate::queue::lock;
use crate::session::Session;
use crate::{Error, VhostUserDevice};

/// `VHOST_USER_GET_FEATURES`, `SET_FEATURES`, `SET_PROTOCOL_FEATURES`.
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_PROTOCOL_FEATURES: u32 = 16;

/// A connection (and listening socket) taken over from another process, ready to be served
/// by [`VhostUserDevice::serve_imported`] or [`VhostUserDevice::spawn_imported`]. Dropped
/// unserved, it forgets the rings it restored.
pub struct Imported {
    dev: Arc<VhostUserDevice>,
    listener: Option<UnixListener>,
    session: Option<Session>,
    /// Dropping this forgets the rings and memory restored (not once served).
    armed: bool,
}

impl Imported {
    /// Whether a frontend connection was taken over (not only the listening socket).
    pub fn has_connection(&self) -> bool {
        self.session.is_some()
    }
}

impl Drop for Imported {
    fn drop(&mut self) {
        let session = self.session.take();
        if !self.armed {
            return;
        }
        drop(session);
        self.dev.backend_channel().take();
        for q in &self.dev.queues {
            lock(q).reset();
        }
        self.dev.frontend_memory().release_unused();
    }
}

/// The descriptors handed over, each taken once.
struct Slots(Vec<Option<OwnedFd>>);

impl Slots {
    fn take(&mut self, index: usize, what: &str) -> Result<OwnedFd, HandoverError> {
        self.0
            .get_mut(index)
            .and_then(Option::take)
            .ok_or_else(|| HandoverError::MissingFd {
                index,
                what: what.into(),
            })
    }

    fn take_opt(
        &mut self,
        index: Option<usize>,
        what: &str,
    ) -> Result<Option<File>, HandoverError> {
        index
            .map(|i| self.take(i, what).map(File::from))
            .transpose()
    }
}

impl VhostUserDevice {
    /// Take over a device another process exported ([`VhostUserDevice::export`]): `state`
    /// and the descriptors it names (`fds`, in the order they were exported). This device
    /// must be new (built by [`VhostUserDevice::new`] from the same device specification)
    /// and not served yet. Every region is checked against its file and mapped again, every
    /// ring against the memory table; a state that does not fit is an error and nothing is
    /// kept. Nothing is served until [`Self::serve_imported`].
    pub fn import(
        self: &Arc<Self>,
        state: &HandoverState,
        fds: Vec<OwnedFd>,
    ) -> Result<Imported, HandoverError> {
        if state.version != HANDOVER_VERSION {
            return Err(HandoverError::Version {
                found: state.version,
            });
        }
        let connected = self
            .connection
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        if connected || self.handed_over() || self.queues.iter().any(|q| lock(q).fds()[0].is_some())
        {
            return Err(HandoverError::Mismatch(
                "this device serves a frontend already: import into a new device".into(),
            ));
        }
        let mut slots = Slots(fds.into_iter().map(Some).collect());
        let listener = UnixListener::from(slots.take(state.listener, "the listening socket")?);
        let session = state
            .connection
            .as_ref()
            .map(|conn| self.import_connection(conn, &mut slots))
            .transpose()?;
        Ok(Imported {
            dev: self.clone(),
            armed: session.is_some(),
            listener: Some(listener),
            session,
        })
    }

    fn import_connection(
        self: &Arc<Self>,
        state: &ConnectionState,
        slots: &mut Slots,
    ) -> Result<Session, HandoverError> {
        let mismatch = |m: String| HandoverError::Mismatch(m);
        if state.vrings.len() > self.queues.len() {
            return Err(mismatch(format!(
                "{} rings, the device has {} queues",
                state.vrings.len(),
                self.queues.len()
            )));
        }
        let stream = UnixStream::from(slots.take(state.socket, "the frontend's socket")?);
        let mut session = Session::new(self, stream)
            .map_err(|e| HandoverError::io("setting up the connection", e))?;
        session.imported = true;
        session.wire.restore(&state.wire);
        // From here on, a failure forgets what was restored: dropping `partial` does.
        let mut partial = Imported {
            dev: self.clone(),
            listener: None,
            session: Some(session),
            armed: true,
        };
        let s = partial.session.as_mut().expect("just set");
        self.replay_negotiation(s, state)?;
        self.map_memory(s, state, slots)?;
        if let Some(inf) = state.inflight.as_ref() {
            let file = File::from(slots.take(inf.fd, "the in-flight region")?);
            let wake = s.conn().poison_wake.clone();
            let region = InflightRegion::open_watched(
                file,
                inf.mmap_offset,
                inf.mmap_size,
                inf.num_queues,
                inf.queue_size,
                Some(wake),
            )
            .map_err(|e| mismatch(format!("in-flight region: {e}")))?;
            s.conn().inflight = Some(region);
        }
        if let Some(index) = state.backend_channel {
            let sock = UnixStream::from(slots.take(index, "the backend channel")?);
            let acked = state.acked_protocol.unwrap_or(0);
            let channel = BackendChannel::new(sock, acked)
                .map_err(|e| HandoverError::io("setting up the backend channel", e))?;
            *self.backend_channel() = Some(channel);
        }
        self.restore_rings(s, state, slots)?;
        partial.armed = false;
        Ok(partial.session.take().expect("set above"))
    }

    /// Bring the `vhost` crate's request handler (and ours) to the negotiated state by
    /// passing it the same negotiation messages (their replies are dropped).
    fn replay_negotiation(
        &self,
        s: &mut Session,
        state: &ConnectionState,
    ) -> Result<(), HandoverError> {
        let mut messages = Vec::new();
        if state.features_read {
            messages.push((GET_FEATURES, Vec::new()));
        }
        if let Some(f) = state.acked_features {
            messages.push((SET_FEATURES, f.to_le_bytes().to_vec()));
        }
        if let Some(f) = state.acked_protocol {
            messages.push((SET_PROTOCOL_FEATURES, f.to_le_bytes().to_vec()));
        }
        for (request, payload) in messages {
            s.wire
                .inject(request, &payload)
                .map_err(|e| HandoverError::io("replaying the negotiation", e))?;
            let handled = s.requests.handle_request();
            s.wire.discard_replies();
            handled.map_err(|e| {
                HandoverError::Mismatch(format!("replaying request {request} refused: {e}"))
            })?;
        }
        s.conn().owner = state.owner;
        Ok(())
    }

    /// Map the memory table again (each region checked against its file).
    fn map_memory(
        &self,
        s: &Session,
        state: &ConnectionState,
        slots: &mut Slots,
    ) -> Result<(), HandoverError> {
        let mut conn = s.conn();
        let mut regions = Vec::with_capacity(state.regions.len());
        let mut mappings = Vec::with_capacity(state.regions.len());
        for (index, r) in state.regions.iter().enumerate() {
            let file = File::from(slots.take(r.fd, &format!("memory region {index}"))?);
            let msg = VhostUserMemoryRegion::new(r.guest_addr, r.size, r.user_addr, r.mmap_offset);
            let (mapped, mapping) =
                conn.map_region(index, &msg, file)
                    .map_err(|e| HandoverError::Region {
                        index,
                        reason: format!(
                            "cannot be mapped again ({e}): offset {:#x} + size {:#x} must lie in its file",
                            r.mmap_offset, r.size
                        ),
                    })?;
            regions.push(mapped);
            mappings.push(mapping);
        }
        // vm-memory wants the regions in address order; the table keeps the frontend's.
        regions.sort_by_key(|r| r.start_addr());
        let mem = GuestMemoryMmap::from_arc_regions(regions).map_err(|e| HandoverError::Region {
            index: 0,
            reason: format!("the regions do not form a memory table: {e}"),
        });
        let mem = match mem {
            Ok(mem) => mem,
            Err(err) => {
                drop(mappings);
                self.frontend_memory().release_unused();
                return Err(err);
            }
        };
        conn.mem = Arc::new(mem);
        conn.mappings = mappings;
        Ok(())
    }

    /// Restore each ring, checked against the memory table. Queues get the memory (and the
    /// started rings are served) only when serving begins.
    fn restore_rings(
        &self,
        session: &Session,
        state: &ConnectionState,
        slots: &mut Slots,
    ) -> Result<(), HandoverError> {
        let mem = session.conn().mem.clone();
        let mut seen = vec![false; self.queues.len()];
        for v in &state.vrings {
            let index = usize::from(v.index);
            if index >= self.queues.len() || std::mem::replace(&mut seen[index], true) {
                return Err(HandoverError::Mismatch(format!(
                    "ring {index} is not a queue of the device or is named twice"
                )));
            }
            let what = |kind: &str| format!("the {kind} eventfd of ring {index}");
            let fds = [
                slots.take_opt(v.kick, &what("kick"))?,
                slots.take_opt(v.call, &what("call"))?,
                slots.take_opt(v.err, &what("error"))?,
            ];
            let max = self.device.max_queue_size();
            if v.ring.size == 0 || v.ring.size > max {
                return Err(HandoverError::Mismatch(format!(
                    "ring {index} has {} descriptors, the device allows 1..={max}",
                    v.ring.size
                )));
            }
            let mut st = lock(&self.queues[index]);
            st.restore(&v.ring, fds)
                .map_err(|e| HandoverError::Mismatch(format!("ring {index}: {e}")))?;
            if v.ring.ready && !st.svc.queue().is_valid(mem.as_ref()) {
                return Err(HandoverError::Mismatch(format!(
                    "ring {index} lies outside the memory table"
                )));
            }
        }
        Ok(())
    }

    /// Serve an imported connection first (the frontend notices nothing), then the frontends
    /// that connect to the listening socket, as [`Self::serve`] does. Call it only once the
    /// exporting process committed ([`crate::Export::commit`]): from the first request served
    /// here on, that process can no longer resume.
    pub fn serve_imported(
        self: &Arc<Self>,
        mut imported: Imported,
        stop: &AtomicBool,
    ) -> Result<(), Error> {
        imported.armed = false;
        let listener = imported.listener.take().expect("set by import");
        let session = imported.session.take();
        self.serve_from(listener, session, stop)
    }
}
