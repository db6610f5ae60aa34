//! The virtio-blk request handler of one queue: parse → backend → status byte.

use std::os::fd::RawFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtiod_backend::{Backend, BackendQueue, Completion, Direction, IoBuffers, IoRequest, Op};
use virtiod_core::{Chain, Completed, GuestMem, HandlerError, Outcome, QueueHandler};
use vm_memory::{Bytes, GuestAddress};

use crate::qos::{Admit, Class, Qos};
use crate::request::{self, Request, RequestError, RequestType, ID_LEN};
use crate::stats::{OpKind, QueueStats};
use crate::{BlkConfig, Stats, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};

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
    started: Instant,
}

/// Longest a held request waits before its limit is looked at again (a limit changed live
/// applies within this).
const MAX_RECHECK: Duration = Duration::from_millis(50);

/// A request held back by a QoS limit (its parsed form is in `BlkQueue::held_req`).
struct Held {
    op: Op,
    kind: OpKind,
    class: Class,
    bytes: u64,
    mem: Arc<GuestMem>,
    since: Instant,
    next_try: Instant,
}

/// Executes the virtio-blk requests of one queue on its own backend I/O context (for the
/// file backend: its own `io_uring`).
///
/// Under a QoS limit ([`Qos`], shared by the device's queues) a request that may not go yet
/// is held (at most one per queue): the queue takes nothing more from the ring until it has
/// gone, and asks the core to be woken when it may ([`QueueHandler::retry_after`]).
pub struct BlkQueue {
    cfg: Arc<BlkConfig>,
    io: Box<dyn BackendQueue>,
    stats: Arc<Stats>,
    index: usize,
    slots: Vec<Slot>,
    free: Vec<u32>,
    req: Request,
    done: Vec<Completion>,
    qos: Arc<Qos>,
    held: Option<Held>,
    held_req: Request,
    /// A held request that was answered without the backend when it was let go.
    answered: Option<Completed>,
    /// The device's capacity in sectors, when it can change while serving.
    capacity: Option<Arc<std::sync::atomic::AtomicU64>>,
}

impl BlkQueue {
    /// The handler of queue `index`; it holds up to `cfg.queue_size` requests in flight.
    pub fn new(
        cfg: Arc<BlkConfig>,
        backend: &dyn Backend,
        stats: Arc<Stats>,
        index: usize,
    ) -> Result<Self, virtiod_backend::Error> {
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
                started: Instant::now(),
            })
            .collect();
        Ok(Self {
            cfg,
            io,
            stats,
            index,
            slots,
            free: (0..depth).rev().collect(),
            req: Request::default(),
            done: Vec::with_capacity(depth as usize),
            qos: Arc::new(Qos::unlimited()),
            held: None,
            held_req: Request::default(),
            answered: None,
            capacity: None,
        })
    }

    /// Follow the device's capacity (sectors) as it changes (an online resize): requests
    /// are checked against the capacity at the time they are parsed.
    pub fn with_capacity(mut self, capacity: Arc<std::sync::atomic::AtomicU64>) -> Self {
        self.capacity = Some(capacity);
        self
    }

    /// Take a new capacity into the queue's copy of the configuration (only when it changed:
    /// one atomic load per request otherwise).
    fn follow_capacity(&mut self) {
        if let Some(capacity) = &self.capacity {
            let sectors = capacity.load(std::sync::atomic::Ordering::Acquire);
            if sectors != self.cfg.capacity_sectors {
                Arc::make_mut(&mut self.cfg).capacity_sectors = sectors;
            }
        }
    }

    /// Count this queue's requests against `qos` (the device's limits).
    pub fn with_qos(mut self, qos: Arc<Qos>) -> Self {
        self.qos = qos;
        self
    }

    /// Hold the parsed request if a limit says it must wait. Returns whether it was held.
    fn hold_if_limited(&mut self, mem: &Arc<GuestMem>, op: Op, kind: OpKind) -> bool {
        let Some(class) = Class::of(kind) else {
            return false;
        };
        if !self.qos.is_active() {
            return false;
        }
        let bytes = match op {
            Op::Read | Op::Write => self.req.data_len,
            _ => 0,
        };
        let now = Instant::now();
        let Admit::Wait(wait) = self.qos.admit(class, bytes, now) else {
            return false;
        };
        std::mem::swap(&mut self.req, &mut self.held_req);
        self.held = Some(Held {
            op,
            kind,
            class,
            bytes,
            mem: mem.clone(),
            since: now,
            next_try: now + wait.min(MAX_RECHECK),
        });
        true
    }

    /// Send the held request to the backend if its limit lets it go now (or at once with
    /// `force`, when the queue is being drained).
    fn release_held(&mut self, force: bool) {
        let Some(held) = self.held.as_mut() else {
            return;
        };
        let now = Instant::now();
        if !force {
            match self.qos.admit(held.class, held.bytes, now) {
                Admit::Go => {}
                Admit::Wait(wait) => {
                    held.next_try = now + wait.min(MAX_RECHECK);
                    return;
                }
            }
        }
        let Some(held) = self.held.take() else {
            return;
        };
        self.qos
            .record_throttled(now.saturating_duration_since(held.since));
        std::mem::swap(&mut self.req, &mut self.held_req);
        if let Outcome::Done { used_len } = self.submit_to_backend(&held.mem, held.op, held.kind) {
            self.answered = Some(Completed {
                head: self.req.head,
                used_len,
            });
        }
    }

    fn queue_stats(&self) -> &QueueStats {
        &self.stats.queues[self.index]
    }

    /// Answer the request in `self.req` without the backend.
    fn finish_now(&self, mem: &GuestMem, code: u8, written: u32, kind: OpKind) -> Outcome {
        let used_len = match self.req.status {
            Some(addr) if mem.write_obj(code, addr).is_ok() => written + 1,
            _ => 0,
        };
        self.queue_stats()
            .completed(kind, u64::from(written), code == VIRTIO_BLK_S_OK);
        Outcome::Done { used_len }
    }

    /// GET_ID: copy the serial into the request's buffers.
    fn get_id(&self, mem: &GuestMem) -> Outcome {
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
        self.finish_now(mem, code, pos as u32, OpKind::Other)
    }

    /// Hand the parsed request to the backend in a free slot.
    fn submit_to_backend(&mut self, mem: &Arc<GuestMem>, op: Op, op_kind: OpKind) -> Outcome {
        let Some(tag) = self.free.pop() else {
            // Not reached: the service only starts requests while `can_start`.
            return self.finish_now(mem, VIRTIO_BLK_S_IOERR, 0, op_kind);
        };
        let req = &self.req;
        let slot = &mut self.slots[tag as usize];
        slot.head = req.head;
        slot.status = req.status.unwrap_or(GuestAddress(0)); // parsed: the status is set
        slot.kind = op_kind;
        slot.data_len = req.data_len;
        slot.written = if op == Op::Read {
            req.data_len as u32
        } else {
            0
        };
        let direction = if op == Op::Read {
            Direction::DeviceWrites
        } else {
            Direction::DeviceReads
        };
        let segments = req.data.iter().map(|seg| (seg.addr, seg.len as usize));
        if let Err(err) = slot.buffers.set(mem.clone(), segments, direction) {
            tracing::debug!(queue = self.index, head = req.head, %err, "unusable data buffers");
            self.free.push(tag);
            return self.finish_now(mem, VIRTIO_BLK_S_IOERR, 0, op_kind);
        }
        let (offset, len) = match op {
            Op::Discard | Op::WriteZeroes { .. } => (req.sector * 512, req.num_sectors * 512),
            // The sector of a FLUSH is not checked (it can be anything): don't use it.
            Op::Flush => (0, 0),
            _ => (req.sector * 512, req.data_len),
        };
        let io_req = IoRequest {
            op,
            offset,
            len,
            buffers: std::mem::take(&mut slot.buffers),
        };
        if let Err(err) = self.io.submit(io_req, tag) {
            tracing::warn!(queue = self.index, %err, "backend refused a request");
            self.free.push(tag);
            return self.finish_now(mem, VIRTIO_BLK_S_IOERR, 0, op_kind);
        }
        let slot = &mut self.slots[tag as usize];
        slot.busy = true;
        slot.started = Instant::now();
        self.queue_stats().in_flight.fetch_add(1, Relaxed);
        Outcome::Started
    }

    /// The used entry of a backend completion (status byte written, slot freed, counted).
    fn complete(&mut self, c: Completion) -> Option<Completed> {
        let Completion {
            tag,
            result,
            mut buffers,
        } = c;
        let slot = self.slots.get_mut(tag as usize)?;
        if !std::mem::take(&mut slot.busy) {
            return None; // not in flight: ignore a stray completion
        }
        let (code, written) = match result {
            Ok(_) => (VIRTIO_BLK_S_OK, slot.written),
            Err(errno) => {
                tracing::warn!(queue = self.index, errno, "I/O error from the backend");
                (VIRTIO_BLK_S_IOERR, 0)
            }
        };
        // The status byte goes through the memory snapshot the request was started with.
        let status_written = buffers
            .memory()
            .is_some_and(|m| m.write_obj(code, slot.status).is_ok());
        let used_len = if status_written { written + 1 } else { 0 };
        buffers.clear(); // release the memory snapshot, keep the vectors
        slot.buffers = buffers;
        let (head, kind, data_len, started) = (slot.head, slot.kind, slot.data_len, slot.started);
        self.free.push(tag);
        let qs = &self.stats.queues[self.index];
        qs.in_flight.fetch_sub(1, Relaxed);
        qs.observe_latency(started.elapsed());
        let ok = code == VIRTIO_BLK_S_OK;
        qs.completed(kind, if ok { data_len } else { 0 }, ok);
        Some(Completed { head, used_len })
    }
}

impl QueueHandler for BlkQueue {
    fn can_start(&self) -> bool {
        !self.free.is_empty() && self.held.is_none()
    }

    fn start(&mut self, chain: &Chain, mem: &Arc<GuestMem>) -> Outcome {
        self.follow_capacity();
        let parsed = request::parse(chain, mem.as_ref(), &self.cfg, &mut self.req);
        let kind = match parsed {
            Ok(kind) => kind,
            Err(err) => {
                tracing::debug!(queue = self.index, head = chain.head(), %err, "refused request");
                let code = if matches!(err, RequestError::Unsupported(_)) {
                    VIRTIO_BLK_S_UNSUPP
                } else {
                    VIRTIO_BLK_S_IOERR
                };
                return self.finish_now(mem, code, 0, OpKind::Other);
            }
        };
        let (op, op_kind) = match kind {
            RequestType::GetId => return self.get_id(mem),
            RequestType::In => (Op::Read, OpKind::Read),
            RequestType::Out => (Op::Write, OpKind::Write),
            RequestType::Flush => (Op::Flush, OpKind::Flush),
            RequestType::Discard => (Op::Discard, OpKind::Discard),
            RequestType::WriteZeroes { unmap } => (Op::WriteZeroes { unmap }, OpKind::WriteZeroes),
        };
        if self.hold_if_limited(mem, op, op_kind) {
            return Outcome::Started;
        }
        self.submit_to_backend(mem, op, op_kind)
    }

    fn submit(&mut self) -> Result<(), HandlerError> {
        self.release_held(false);
        self.io
            .commit()
            .map_err(|e| HandlerError(format!("storage backend: {e}")))
    }

    fn completion_fd(&self) -> Option<RawFd> {
        self.io.completion_fd()
    }

    fn ack_completion_event(&mut self) {
        self.io.ack_completion_event();
    }

    fn reap(&mut self, out: &mut Vec<Completed>) {
        out.extend(self.answered.take());
        self.io.reap(&mut self.done);
        let mut done = std::mem::take(&mut self.done);
        for c in done.drain(..) {
            out.extend(self.complete(c));
        }
        self.done = done;
    }

    fn wait(&mut self) -> Result<(), HandlerError> {
        if self.held.is_some() {
            // Draining (reset, stop): what is held goes now, whatever the limit.
            self.release_held(true);
            self.submit()?;
        }
        if self.answered.is_some() {
            return Ok(());
        }
        self.io
            .wait()
            .map_err(|e| HandlerError(format!("storage backend: {e}")))
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
            + usize::from(self.held.is_some())
            + usize::from(self.answered.is_some())
    }

    fn retry_after(&self) -> Option<Duration> {
        let held = self.held.as_ref()?;
        Some(held.next_try.saturating_duration_since(Instant::now()))
    }
}

#[cfg(test)]
#[path = "queue_tests.rs"]
pub(crate) mod tests;
