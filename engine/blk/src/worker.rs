//! One queue's request loop: avail ring → parse → backend → used ring.

use std::os::fd::RawFd;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtiod_backend::{
    Backend, BackendQueue, Completion, Direction, DriverMemory, IoBuffers, IoRequest, Op,
};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::chain::HeadChain;
use crate::request::{self, Request, RequestError, RequestType, ID_LEN};
use crate::stats::{OpKind, QueueStats};
use crate::InflightTracker;
use crate::{BlkConfig, Stats, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};

/// Errors that stop a queue (the driver broke the ring itself, or the backend failed).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The backend could not set up or submit.
    #[error("storage backend: {0}")]
    Backend(#[from] virtiod_backend::Error),
    /// The rings are not in the driver's memory.
    #[error("virtqueue: {0}")]
    Queue(#[from] virtio_queue::Error),
}

/// A request the backend is executing.
struct Slot {
    head: u16,
    status: GuestAddress,
    kind: OpKind,
    /// Bytes the device writes into the chain on success (excluding the status byte).
    written: u32,
    data_len: u64,
    /// While idle: the vectors the next request's buffers are built in (the backend owns
    /// them while the request runs and hands them back with its completion).
    buffers: IoBuffers,
    /// Submitted to the backend and not yet completed.
    busy: bool,
    /// When it was submitted to the backend (for the latency histogram).
    started: std::time::Instant,
}

/// Requests started per backend submission while a long batch is being parsed.
const SUBMIT_BATCH: u32 = 4;

/// Longest single busy-poll period before going back to the event loop.
const MAX_POLL: std::time::Duration = std::time::Duration::from_millis(2);

/// State of one busy-poll period (see [`QueueWorker::poll_step`]).
#[derive(Debug)]
pub struct Poll {
    budget: std::time::Duration,
    started: std::time::Instant,
    last_work: std::time::Instant,
    ending: bool,
    done: bool,
}

impl Poll {
    /// Poll until nothing happened for `budget`.
    pub fn new(budget: std::time::Duration) -> Self {
        let now = std::time::Instant::now();
        Self {
            budget,
            started: now,
            last_work: now,
            ending: false,
            done: false,
        }
    }
}

/// Serves one virtqueue of a virtio-blk device.
pub struct QueueWorker<M> {
    cfg: Arc<BlkConfig>,
    io: Box<dyn BackendQueue>,
    stats: Arc<Stats>,
    queue_index: usize,
    slots: Vec<Slot>,
    free: Vec<u32>,
    req: Request,
    done: Vec<Completion>,
    /// Used ring entries added since the last notification decision.
    pending_used: bool,
    /// The transport's in-flight log, if it keeps one.
    tracker: Option<Box<dyn InflightTracker>>,
    /// Inside [`Self::busy_poll`]: driver notifications stay off.
    polling: bool,
    /// Requests started since the backend was last told to submit.
    unsubmitted: u32,
    /// The driver memory type the transport hands in (requests hold it as `DriverMemory`).
    _mem: std::marker::PhantomData<fn() -> M>,
}

impl<M> QueueWorker<M>
where
    M: GuestMemory + Send + Sync,
    // Request buffers own the driver memory, which is concretely `DriverMemory`.
    Arc<M>: Into<Arc<DriverMemory>>,
{
    /// A worker for queue `queue_index` of a device; it can hold `cfg.queue_size` requests
    /// in flight.
    pub fn new(
        cfg: Arc<BlkConfig>,
        backend: &dyn Backend,
        stats: Arc<Stats>,
        queue_index: usize,
    ) -> Result<Self, WorkerError> {
        let depth = u32::from(cfg.queue_size.max(1));
        let io = backend.queue(depth)?;
        let slots = (0..depth)
            .map(|_| Slot {
                head: 0,
                status: GuestAddress(0),
                kind: OpKind::Other,
                written: 0,
                data_len: 0,
                buffers: IoBuffers::with_capacity(8),
                busy: false,
                started: std::time::Instant::now(),
            })
            .collect();
        Ok(Self {
            cfg,
            io,
            stats,
            queue_index,
            slots,
            free: (0..depth).rev().collect(),
            req: Request::default(),
            done: Vec::with_capacity(depth as usize),
            pending_used: false,
            tracker: None,
            polling: false,
            unsubmitted: 0,
            _mem: std::marker::PhantomData,
        })
    }

    /// A descriptor that becomes readable when backend completions are ready (register it
    /// with the thread's event loop and call [`Self::process_completions`] on it).
    pub fn completion_fd(&self) -> Option<RawFd> {
        self.io.completion_fd()
    }

    /// Report every pop and every used entry to `tracker` from now on (see
    /// [`InflightTracker`]).
    pub fn set_tracker(&mut self, tracker: Option<Box<dyn InflightTracker>>) {
        self.tracker = tracker;
    }

    /// Execute again the requests at `heads`, which were in flight when a previous process
    /// serving this queue died (they are no longer on the avail ring). Returns whether the
    /// driver must be notified.
    pub fn resubmit(
        &mut self,
        queue: &mut Queue,
        mem: &Arc<M>,
        heads: &[u16],
    ) -> Result<bool, WorkerError> {
        for &head in heads {
            if head >= queue.size() {
                tracing::warn!(
                    queue = self.queue_index,
                    head,
                    "in-flight log names a head outside the queue"
                );
                continue;
            }
            if self.free.is_empty() {
                break;
            }
            let descs = HeadChain::new(
                mem.as_ref(),
                GuestAddress(queue.desc_table()),
                queue.size(),
                head,
            );
            let parsed =
                request::parse_descriptors(head, descs, mem.as_ref(), &self.cfg, &mut self.req);
            self.start(queue, mem, parsed)?;
        }
        self.io.commit()?;
        if self.io.completion_fd().is_none() {
            self.reap(queue, mem.as_ref())?;
        }
        self.notify_decision(queue, mem.as_ref())
    }

    /// Call when woken by [`Self::completion_fd`], before [`Self::process_completions`].
    pub fn ack_completion_event(&mut self) {
        self.io.ack_completion_event();
    }

    /// Requests started and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn queue_stats(&self) -> &QueueStats {
        &self.stats.queues[self.queue_index]
    }

    /// Take every available request off `queue` and start it. Returns whether the driver
    /// must be notified (used entries were added and the driver wants an interrupt).
    pub fn process_queue(&mut self, queue: &mut Queue, mem: &Arc<M>) -> Result<bool, WorkerError> {
        let mut mem = mem.clone();
        self.process_queue_remap(queue, &mut mem, &mut || None)
    }

    /// Like [`Self::process_queue`], for transports whose driver memory is mapped on demand
    /// (VDUSE's IOTLB): when a chain refers to memory that is not mapped, `remap` is called
    /// once for that chain; if it returns a new memory snapshot, `mem` is replaced and the
    /// chain is parsed again. Otherwise the chain fails as usual.
    pub fn process_queue_remap(
        &mut self,
        queue: &mut Queue,
        mem: &mut Arc<M>,
        remap: &mut dyn FnMut() -> Option<Arc<M>>,
    ) -> Result<bool, WorkerError> {
        let mut retried = false;
        let mut pending_seen = false;
        loop {
            queue.disable_notification(mem.as_ref())?;
            let mut popped = false;
            while !self.free.is_empty() {
                let Some(chain) = queue.pop_descriptor_chain(mem.as_ref()) else {
                    break;
                };
                popped = true;
                let parsed = request::parse(chain, &self.cfg, &mut self.req);
                let unmapped = matches!(
                    parsed,
                    Err(RequestError::BadAddress
                        | RequestError::EmptyChain
                        | RequestError::BrokenChain
                        | RequestError::NoStatus)
                );
                if unmapped && !retried {
                    if let Some(fresh) = remap() {
                        *mem = fresh;
                        queue.go_to_previous_position();
                        retried = true;
                        continue;
                    }
                }
                retried = false;
                if let Some(t) = self.tracker.as_mut() {
                    t.popped(self.req.head, queue.next_avail());
                }
                self.start(queue, mem, parsed)?;
                self.unsubmitted += 1;
                if self.unsubmitted >= SUBMIT_BATCH {
                    // Start the device on the first requests of a long batch instead of after
                    // parsing all of them: the device queue does not run dry between batches.
                    self.io.commit()?;
                    self.unsubmitted = 0;
                }
            }
            if pending_seen && !popped {
                // The ring said requests were pending, yet none could be taken: the avail
                // index is more than a queue size ahead or the ring is not in memory.
                // Looping again would spin forever.
                return Err(virtio_queue::Error::InvalidAvailRingIndex.into());
            }
            self.io.commit()?;
            self.unsubmitted = 0;
            if self.io.completion_fd().is_none() {
                self.reap(queue, mem.as_ref())?;
            }
            if self.free.is_empty() || self.polling {
                // Out of slots: leave the rest on the ring until completions free some.
                // Polling: leave notifications off, the poll loop comes back by itself.
                break;
            }
            if !queue.enable_notification(mem.as_ref())? {
                break;
            }
            pending_seen = true;
        }
        self.notify_decision(queue, mem.as_ref())
    }

    /// Busy-poll the queue and the backend's completions without sleeping, until nothing
    /// happened for `budget`; then turn driver notifications back on (serving whatever arrived
    /// meanwhile) so the caller can sleep on its eventfds again. While polling, the driver is
    /// asked not to kick, which saves it a system call per request. `notify` is called
    /// whenever the driver wants an interrupt. A zero budget returns at once.
    pub fn busy_poll(
        &mut self,
        queue: &mut Queue,
        mem: &mut Arc<M>,
        budget: std::time::Duration,
        remap: &mut dyn FnMut() -> Option<Arc<M>>,
        notify: &mut dyn FnMut(),
    ) -> Result<(), WorkerError> {
        let mut poll = Poll::new(budget);
        while let Some(wants_irq) = self.poll_step(&mut poll, queue, mem, remap)? {
            if wants_irq {
                notify();
            }
        }
        Ok(())
    }

    /// One step of [`Self::busy_poll`], for callers that must signal the driver between
    /// steps themselves: `Some(wants_irq)` while polling goes on, `None` once it has ended
    /// (notifications are then back on; an interrupt that was needed was reported before).
    pub fn poll_step(
        &mut self,
        poll: &mut Poll,
        queue: &mut Queue,
        mem: &mut Arc<M>,
        remap: &mut dyn FnMut() -> Option<Arc<M>>,
    ) -> Result<Option<bool>, WorkerError> {
        if poll.done {
            return Ok(None);
        }
        if poll.budget.is_zero() || poll.ending {
            // Sleep again: notifications on, serving whatever arrived in between.
            poll.done = true;
            self.polling = false;
            return self.process_queue_remap(queue, mem, remap).map(Some);
        }
        self.polling = true;
        let before = (queue.next_avail(), queue.next_used());
        let step = self
            .process_completions(queue, mem.as_ref())
            .and_then(|a| Ok(a | self.process_queue_remap(queue, mem, remap)?));
        if step.is_err() {
            self.polling = false;
            poll.done = true;
        }
        let wants_irq = step?;
        let now = std::time::Instant::now();
        if (queue.next_avail(), queue.next_used()) != before {
            poll.last_work = now;
        } else if now.duration_since(poll.last_work) >= poll.budget {
            poll.ending = true;
        }
        if now.duration_since(poll.started) >= MAX_POLL.max(poll.budget * 4) {
            // Give the transport's control path (which needs the queue's locks) a turn.
            poll.ending = true;
        } else {
            std::hint::spin_loop();
        }
        Ok(Some(wants_irq))
    }

    /// Complete what the backend finished. Returns whether the driver must be notified.
    pub fn process_completions(&mut self, queue: &mut Queue, mem: &M) -> Result<bool, WorkerError> {
        self.reap(queue, mem)?;
        self.notify_decision(queue, mem)
    }

    /// Wait until every in-flight request has completed and is in the used ring.
    pub fn drain(&mut self, queue: &mut Queue, mem: &M) -> Result<bool, WorkerError> {
        while self.in_flight() > 0 {
            self.io.wait()?;
            self.reap(queue, mem)?;
        }
        self.notify_decision(queue, mem)
    }

    fn notify_decision(&mut self, queue: &mut Queue, mem: &M) -> Result<bool, WorkerError> {
        if !std::mem::take(&mut self.pending_used) {
            return Ok(false);
        }
        Ok(queue.needs_notification(mem)?)
    }

    /// Complete the request in `self.req` without the backend.
    fn complete_now(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        code: u8,
        written: u32,
        kind: OpKind,
    ) -> Result<(), WorkerError> {
        let head = self.req.head;
        let used_len = match self.req.status {
            Some(addr) if mem.write_obj(code, addr).is_ok() => written + 1,
            _ => 0,
        };
        self.queue_stats()
            .completed(kind, u64::from(written), code == VIRTIO_BLK_S_OK);
        self.publish_used(queue, mem, head, used_len)
    }

    /// Add the used entry for `head`, telling the in-flight tracker before and after.
    fn publish_used(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        head: u16,
        used_len: u32,
    ) -> Result<(), WorkerError> {
        if let Some(t) = self.tracker.as_mut() {
            t.completing(head);
        }
        queue.add_used(mem, head, used_len)?;
        if let Some(t) = self.tracker.as_mut() {
            t.used(head, queue.next_used());
        }
        self.pending_used = true;
        Ok(())
    }

    fn start(
        &mut self,
        queue: &mut Queue,
        mem: &Arc<M>,
        parsed: Result<RequestType, RequestError>,
    ) -> Result<(), WorkerError> {
        let head = self.req.head;
        let status = self.req.status;
        let kind = match parsed {
            Ok(kind) => kind,
            Err(err) => {
                tracing::debug!(queue = self.queue_index, head, %err, "refused request");
                let code = if matches!(err, RequestError::Unsupported(_)) {
                    VIRTIO_BLK_S_UNSUPP
                } else {
                    VIRTIO_BLK_S_IOERR
                };
                return self.complete_now(queue, mem, code, 0, OpKind::Other);
            }
        };
        let status = status.unwrap_or(GuestAddress(0)); // parse succeeded: status is set
        let (op, op_kind) = match kind {
            RequestType::GetId => {
                let mut id = [0u8; ID_LEN as usize];
                id[..self.cfg.serial.len()].copy_from_slice(&self.cfg.serial);
                let mut pos = 0usize;
                let want = self.req.data_len as usize;
                let mut ok = true;
                for seg in &self.req.data {
                    let n = (want - pos).min(seg.len as usize);
                    ok &= mem.write_slice(&id[pos..pos + n], seg.addr).is_ok();
                    pos += n;
                }
                let code = if ok {
                    VIRTIO_BLK_S_OK
                } else {
                    VIRTIO_BLK_S_IOERR
                };
                return self.complete_now(queue, mem, code, pos as u32, OpKind::Other);
            }
            RequestType::In => (Op::Read, OpKind::Read),
            RequestType::Out => (Op::Write, OpKind::Write),
            RequestType::Flush => (Op::Flush, OpKind::Flush),
            RequestType::Discard => (Op::Discard, OpKind::Discard),
            RequestType::WriteZeroes { unmap } => (Op::WriteZeroes { unmap }, OpKind::WriteZeroes),
        };
        let Some(tag) = self.free.pop() else {
            // Not reached: process_queue only pops chains while a slot is free.
            return self.complete_now(queue, mem, VIRTIO_BLK_S_IOERR, 0, op_kind);
        };
        let slot = &mut self.slots[tag as usize];
        slot.head = head;
        slot.status = status;
        slot.kind = op_kind;
        slot.data_len = self.req.data_len;
        slot.written = if op == Op::Read {
            self.req.data_len as u32
        } else {
            0
        };
        let direction = if op == Op::Read {
            Direction::DeviceWrites
        } else {
            Direction::DeviceReads
        };
        let segments = self.req.data.iter().map(|seg| (seg.addr, seg.len as usize));
        if let Err(err) = slot.buffers.set(mem.clone().into(), segments, direction) {
            tracing::debug!(queue = self.queue_index, head, %err, "unusable data buffers");
            self.free.push(tag);
            return self.complete_now(queue, mem, VIRTIO_BLK_S_IOERR, 0, op_kind);
        }
        let (offset, len) = match op {
            Op::Discard | Op::WriteZeroes { .. } => {
                (self.req.sector * 512, self.req.num_sectors * 512)
            }
            // The sector of a FLUSH is not checked (it can be anything): don't use it.
            Op::Flush => (0, 0),
            _ => (self.req.sector * 512, self.req.data_len),
        };
        let io_req = IoRequest {
            op,
            offset,
            len,
            buffers: std::mem::take(&mut slot.buffers),
        };
        if let Err(err) = self.io.submit(io_req, tag) {
            tracing::warn!(queue = self.queue_index, %err, "backend refused a request");
            self.free.push(tag);
            return self.complete_now(queue, mem, VIRTIO_BLK_S_IOERR, 0, op_kind);
        }
        let slot = &mut self.slots[tag as usize];
        slot.busy = true;
        slot.started = std::time::Instant::now();
        self.queue_stats()
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn reap(&mut self, queue: &mut Queue, mem: &M) -> Result<(), WorkerError> {
        self.io.reap(&mut self.done);
        let mut done = std::mem::take(&mut self.done);
        for Completion {
            tag,
            result,
            mut buffers,
        } in done.drain(..)
        {
            let Some(slot) = self.slots.get_mut(tag as usize) else {
                continue;
            };
            if !std::mem::take(&mut slot.busy) {
                continue; // not in flight: ignore a stray completion
            }
            let (code, written) = match result {
                Ok(_) => (VIRTIO_BLK_S_OK, slot.written),
                Err(errno) => {
                    tracing::warn!(
                        queue = self.queue_index,
                        errno,
                        "I/O error from the backend"
                    );
                    (VIRTIO_BLK_S_IOERR, 0)
                }
            };
            let (head, status, kind, data_len) = (slot.head, slot.status, slot.kind, slot.data_len);
            // The status byte goes through the memory snapshot the request was started with
            // (a backend that dropped the buffers leaves only the current one).
            let status_written = match buffers.memory() {
                Some(slot_mem) => slot_mem.write_obj(code, status).is_ok(),
                None => mem.write_obj(code, status).is_ok(),
            };
            let used_len = if status_written { written + 1 } else { 0 };
            buffers.clear(); // release the memory snapshot, keep the vectors
            slot.buffers = buffers;
            self.free.push(tag);
            let qs = &self.stats.queues[self.queue_index];
            qs.in_flight
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            qs.observe_latency(slot.started.elapsed());
            qs.completed(
                kind,
                if code == VIRTIO_BLK_S_OK { data_len } else { 0 },
                code == VIRTIO_BLK_S_OK,
            );
            self.publish_used(queue, mem, head, used_len)?;
        }
        self.done = done;
        Ok(())
    }
}

#[cfg(test)]
#[path = "worker_tests.rs"]
pub(crate) mod tests;
