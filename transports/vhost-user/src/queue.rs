//! One virtqueue: the core's queue service, the frontend's fds for it, and the thread that
//! serves it.
//!
//! The state lives in a mutex per queue; the queue's thread takes it for every event (kick or
//! backend completion) and the connection's message handler takes it to change the ring's
//! set-up. Nothing else is shared between queues on the data path.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::QueueT;
use virtiod_core::inflight::InflightQueue;
use virtiod_core::{Event, GuestMem, QueueService};
use vm_memory::GuestAddress;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub(crate) type Mem = GuestMem;

/// Epoll token of the thread's exit eventfd.
const TOKEN_EXIT: u64 = 0;
/// Epoll token of the backend's completion fd.
const TOKEN_COMPLETION: u64 = 1;
/// Epoll tokens of kick fds: this plus the kick's generation (a stale event is recognised).
const TOKEN_KICK: u64 = 2;

/// A ring's set-up and position, as a handover records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RingState {
    /// Descriptors in the ring (`SET_VRING_NUM`).
    pub size: u16,
    /// Guest-physical address of the descriptor table.
    pub desc: u64,
    /// Guest-physical address of the avail ring.
    pub avail: u64,
    /// Guest-physical address of the used ring.
    pub used: u64,
    /// The avail index the device takes next.
    pub next_avail: u16,
    /// The used index the device publishes next.
    pub next_used: u16,
    /// `VIRTIO_RING_F_EVENT_IDX` is in use on this ring.
    pub event_idx: bool,
    /// The ring is set up (a kick fd was given).
    pub ready: bool,
    /// Started (`SET_VRING_KICK`) and not stopped since (`GET_VRING_BASE`).
    pub started: bool,
    /// Enabled (`SET_VRING_ENABLE`, or implied without protocol features).
    pub enabled: bool,
}

/// The state of one queue (behind its mutex).
pub(crate) struct QueueState {
    pub index: usize,
    /// The ring and the device's handler.
    pub svc: QueueService,
    /// The driver's memory, while a frontend has set a memory table.
    pub mem: Option<Arc<Mem>>,
    kick: Option<File>,
    kick_gen: u64,
    call: Option<File>,
    /// `SET_VRING_ERR`: nothing is reported on it, it is only kept (and handed over).
    err: Option<File>,
    /// Started by `SET_VRING_KICK`, stopped by `GET_VRING_BASE`.
    started: bool,
    /// `SET_VRING_ENABLE` (or implied when protocol features were not negotiated).
    pub enabled: bool,
    /// Started, not yet served: the next activation reads the used index and recovers.
    activation_pending: bool,
    /// The current connection's queue thread epoll (kick registration).
    epoll: Option<Arc<Epoll>>,
    registered: Option<(i32, u64)>,
}

impl QueueState {
    pub fn new(index: usize, svc: QueueService) -> Self {
        Self {
            index,
            svc,
            mem: None,
            kick: None,
            kick_gen: 0,
            call: None,
            err: None,
            started: false,
            enabled: false,
            activation_pending: false,
            epoll: None,
            registered: None,
        }
    }

    /// Forget everything of the previous frontend (the queue must have been drained).
    pub fn reset(&mut self) {
        self.unregister();
        self.svc.reset();
        self.mem = None;
        self.kick = None;
        self.call = None;
        self.err = None;
        self.started = false;
        self.enabled = false;
        self.activation_pending = false;
        self.epoll = None;
    }

    pub fn attach_epoll(&mut self, epoll: Option<Arc<Epoll>>) {
        self.unregister();
        self.epoll = epoll;
        self.update_registration();
    }

    fn running(&self) -> bool {
        self.started && self.enabled && !self.svc.is_broken() && self.svc.queue().ready()
    }

    fn unregister(&mut self) {
        if let (Some((fd, token)), Some(epoll)) = (self.registered.take(), self.epoll.as_ref()) {
            let _ = epoll.ctl(
                ControlOperation::Delete,
                fd,
                EpollEvent::new(EventSet::IN, token),
            );
        }
    }

    /// Listen to the kick fd exactly while the ring runs.
    fn update_registration(&mut self) {
        let want = match (&self.kick, self.running()) {
            (Some(kick), true) => Some((kick.as_raw_fd(), TOKEN_KICK + self.kick_gen)),
            _ => None,
        };
        if want == self.registered {
            return;
        }
        self.unregister();
        if let (Some((fd, token)), Some(epoll)) = (want, self.epoll.as_ref()) {
            match epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            ) {
                Ok(()) => self.registered = Some((fd, token)),
                Err(err) => tracing::error!(queue = self.index, %err, "cannot watch the kick fd"),
            }
        }
    }

    pub fn set_kick(&mut self, kick: Option<File>) {
        self.unregister();
        self.kick = kick;
        self.kick_gen += 1;
        if self.started && !self.activation_pending {
            // A new kick fd for a ring that runs: only listen to it. Starting again would
            // resubmit the in-flight requests the handler is still executing.
            self.update_registration();
            return;
        }
        self.started = true;
        self.activation_pending = true;
        self.svc.queue_mut().set_ready(true);
    }

    pub fn set_call(&mut self, call: Option<File>) {
        self.call = call;
        if self.running() {
            // An interrupt may have been due while there was no call fd: a spurious one is
            // harmless, a lost one hangs the driver.
            self.signal();
        }
    }

    pub fn set_err(&mut self, err: Option<File>) {
        self.err = err;
    }

    /// The ring's state as a handover records it (the fds are named by the caller).
    pub fn snapshot(&self) -> RingState {
        let q = self.svc.queue();
        RingState {
            size: q.size(),
            desc: q.desc_table(),
            avail: q.avail_ring(),
            used: q.used_ring(),
            next_avail: q.next_avail(),
            next_used: q.next_used(),
            event_idx: q.event_idx_enabled(),
            ready: q.ready(),
            started: self.started,
            enabled: self.enabled,
        }
    }

    /// The kick, call and error fds.
    pub fn fds(&self) -> [Option<&File>; 3] {
        [self.kick.as_ref(), self.call.as_ref(), self.err.as_ref()]
    }

    /// Take over a ring another process served (see `handover`): its set-up, indexes and
    /// fds. A started ring is activated (recovered, served) when memory is installed.
    pub fn restore(&mut self, ring: &RingState, fds: [Option<File>; 3]) -> Result<(), String> {
        let q = self.svc.queue_mut();
        q.try_set_size(ring.size)
            .map_err(|e| format!("queue size {}: {e}", ring.size))?;
        q.try_set_desc_table_address(GuestAddress(ring.desc))
            .and_then(|()| q.try_set_avail_ring_address(GuestAddress(ring.avail)))
            .and_then(|()| q.try_set_used_ring_address(GuestAddress(ring.used)))
            .map_err(|e| format!("ring addresses: {e}"))?;
        q.set_next_avail(ring.next_avail);
        q.set_next_used(ring.next_used);
        q.set_event_idx(ring.event_idx);
        q.set_ready(ring.ready);
        let [kick, call, err] = fds;
        self.kick = kick;
        self.kick_gen += 1;
        self.call = call;
        self.err = err;
        self.started = ring.started;
        self.enabled = ring.enabled;
        // A started ring is served for the first time in this process: activation reads the
        // used index (or the in-flight block) and serves what is on the ring.
        self.activation_pending = ring.started;
        Ok(())
    }

    pub fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
        self.update_registration();
    }

    /// Whether the ring is started, enabled and has memory, and has not been served since.
    pub fn wants_activation(&self) -> bool {
        self.activation_pending && self.running() && self.mem.is_some()
    }

    /// First service of a started ring: recover in-flight requests from `inflight` (which
    /// then records this process's requests), then serve whatever is on the ring already
    /// (kicks sent before we listened are lost).
    pub fn activate(&mut self, inflight: Option<InflightQueue>) {
        self.activation_pending = false;
        let Some(mem) = self.mem.clone() else {
            return;
        };
        match self.svc.activate(&mem, inflight) {
            Ok(true) => self.signal(),
            Ok(false) => {}
            Err(err) => {
                tracing::error!(queue = self.index, %err, "cannot recover the ring: queue stopped until the frontend sets it up again");
                return;
            }
        }
        self.update_registration();
        self.service(Event::Kick);
        if self.wake_timeout_ms() >= 0 {
            // Served from the message thread: the queue thread sleeps without a timeout and
            // the handler holds requests back (a rate limit) with notifications off. A kick
            // brings the thread round to set its timer.
            if let Some(kick) = self.kick.as_ref() {
                let _ = (&*kick).write(&1u64.to_ne_bytes());
            }
        }
    }

    /// Stop the ring (`GET_VRING_BASE`): complete everything in flight, stop listening, and
    /// return the next avail index.
    pub fn stop(&mut self) -> u16 {
        self.drain();
        self.started = false;
        self.activation_pending = false;
        self.update_registration();
        self.svc.queue_mut().set_ready(false);
        self.kick = None;
        self.call = None;
        self.svc.queue().next_avail()
    }

    pub fn signal(&self) {
        signal_call(self.call.as_ref());
    }

    /// Complete every in-flight request into the used ring (if the ring is still known).
    pub fn drain(&mut self) {
        let Some(mem) = self.mem.clone() else {
            return;
        };
        match self.svc.drain(mem.as_ref()) {
            Ok(true) => self.signal(),
            Ok(false) => {}
            Err(err) => tracing::warn!(queue = self.index, %err, "draining a queue failed"),
        }
    }

    fn consume_kick(&mut self, token: u64) -> bool {
        if token != TOKEN_KICK + self.kick_gen {
            return false; // the fd this event was for has been replaced
        }
        if let Some(kick) = self.kick.as_ref() {
            let mut buf = [0u8; 8];
            let _ = (&*kick).read(&mut buf);
        }
        true
    }

    /// How long the queue thread may sleep without an event (`epoll_wait` timeout; -1: until
    /// an fd is readable): only while the ring runs and the handler holds requests back.
    pub fn wake_timeout_ms(&self) -> i32 {
        if self.mem.is_none() || !self.running() {
            return -1;
        }
        self.svc.wake_timeout_ms()
    }

    /// Serve the queue after `event` (the core busy-polls adaptively and decides when the
    /// driver needs an interrupt). A broken ring stops listening to kicks.
    pub fn service(&mut self, event: Event) {
        let Some(mut mem) = self.mem.clone() else {
            if event == Event::Completion {
                self.svc.ack_completion_event();
            }
            return;
        };
        let call = self.call.as_ref();
        let mut notify = || signal_call(call);
        if !self.running() {
            if event == Event::Completion {
                let _ = self.svc.complete_only(mem.as_ref(), &mut notify);
            }
            return;
        }
        if self
            .svc
            .serve(event, &mut mem, &mut || None, &mut notify)
            .is_err()
        {
            self.update_registration();
        }
    }
}

fn signal_call(call: Option<&File>) {
    if let Some(call) = call {
        let _ = (&*call).write(&1u64.to_ne_bytes());
    }
}

/// The thread serving one queue for the current connection.
pub(crate) struct QueueThread {
    exit: EventFd,
    join: Option<std::thread::JoinHandle<()>>,
}

pub(crate) fn lock(cell: &Mutex<QueueState>) -> MutexGuard<'_, QueueState> {
    cell.lock().unwrap_or_else(|e| e.into_inner())
}

impl QueueThread {
    /// Start serving `cell`: its completion fd is watched at once, its kick fd once the ring
    /// runs.
    pub fn spawn(cell: Arc<Mutex<QueueState>>) -> std::io::Result<Self> {
        let epoll = Arc::new(Epoll::new()?);
        let exit = EventFd::new(EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            exit.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_EXIT),
        )?;
        let index = {
            let mut st = lock(&cell);
            if let Some(fd) = st.svc.completion_fd() {
                epoll.ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, TOKEN_COMPLETION),
                )?;
            }
            st.attach_epoll(Some(epoll.clone()));
            st.index
        };
        let join = std::thread::Builder::new()
            .name(format!("vu-queue-{index}"))
            .spawn(move || run(&cell, &epoll))?;
        Ok(Self {
            exit,
            join: Some(join),
        })
    }

    /// Stop the thread and wait for it.
    pub fn stop(mut self) {
        let _ = self.exit.write(1);
        if let Some(join) = self.join.take() {
            let _ = join.join();
        }
    }
}

fn run(cell: &Mutex<QueueState>, epoll: &Epoll) {
    virtiod_core::confine::enter(virtiod_core::confine::ThreadRole::Queue);
    let mut events = vec![EpollEvent::default(); 8];
    // A handler that holds requests back (a rate limit) asks to be served again after a
    // while even if no fd becomes readable.
    let mut timeout_ms = -1;
    loop {
        let n = match epoll.wait(timeout_ms, &mut events) {
            Ok(n) => n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => {
                tracing::error!(%err, "queue thread: epoll failed");
                return;
            }
        };
        if n == 0 {
            let mut st = lock(cell);
            st.service(Event::Timer);
            timeout_ms = st.wake_timeout_ms();
            continue;
        }
        for ev in &events[..n] {
            let token = ev.data();
            if token == TOKEN_EXIT {
                return;
            }
            let mut st = lock(cell);
            if token == TOKEN_COMPLETION {
                st.service(Event::Completion);
            } else if st.consume_kick(token) {
                st.service(Event::Kick);
            }
            timeout_ms = st.wake_timeout_ms();
        }
    }
}
