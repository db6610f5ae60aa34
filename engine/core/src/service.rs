//! The one virtqueue service every transport uses: avail ring → [`QueueHandler`] → used ring.

use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestAddress;

use crate::inflight::InflightQueue;
use crate::{AdaptivePoll, Chain, Completed, GuestMem, HandlerError, Outcome, QueueHandler};

/// Errors that stop a queue: the driver broke the ring itself, or the handler failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The rings are not in the driver's memory, or their indexes are impossible.
    #[error("virtqueue: {0}")]
    Queue(#[from] virtio_queue::Error),
    /// The device's handler failed (e.g. the backend refused a submission).
    #[error("queue handler: {0}")]
    Handler(#[from] HandlerError),
}

/// What woke the queue's thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The driver kicked (or the transport wants the ring looked at).
    Kick,
    /// The handler's completion fd became readable.
    Completion,
    /// The time [`QueueService::wake_after`] asked for has passed (e.g. a rate limit lets the
    /// next request go).
    Timer,
}

/// Requests started per handler submission while a long batch is being taken off the ring,
/// so the backend does not run dry while the rest is parsed.
const SUBMIT_BATCH: u32 = 4;

/// See [`QueueService::process`]: how many used entries a long batch publishes between two
/// notification decisions.
const NOTIFY_EVERY: u32 = 8;

/// Longest single busy-poll period: then the control path (which needs the queue) gets a turn.
const MAX_POLL_PERIOD: Duration = Duration::from_millis(2);

/// Re-map callback of transports whose driver memory is mapped on demand: returns a newer
/// memory snapshot if there is one.
pub type Remap<'a> = &'a mut dyn FnMut() -> Option<Arc<GuestMem>>;

/// Serves one virtqueue of a device for a transport: takes chains off the avail ring and
/// hands them to the device's [`QueueHandler`], publishes used entries, decides when the
/// driver needs an interrupt (EVENT_IDX included), busy-polls adaptively, re-maps memory on a
/// fault, records requests in flight ([`InflightQueue`]) and executes them again after a
/// restart. A driver that breaks the ring stops this queue only: the error is logged once and
/// the queue stays quiet until the transport resets it.
pub struct QueueService {
    index: u16,
    queue: Queue,
    handler: Box<dyn QueueHandler>,
    chain: Chain,
    done: Vec<Completed>,
    inflight: Option<InflightQueue>,
    pending_used: bool,
    /// Used entries published since the last notification decision.
    used_since_notify: u32,
    polling: bool,
    unsubmitted: u32,
    poll: AdaptivePoll,
    broken: bool,
    /// Check each chain for unmapped memory and ask for a re-map (VDUSE).
    remap_on_fault: bool,
}

impl QueueService {
    /// A service for queue `index`, whose driver may choose up to `max_size` descriptors,
    /// busy-polling at most `max_poll` after the last request (zero: never).
    pub fn new(
        index: u16,
        handler: Box<dyn QueueHandler>,
        max_size: u16,
        max_poll: Duration,
    ) -> Result<Self, ServiceError> {
        Ok(Self {
            index,
            queue: Queue::new(max_size)?,
            handler,
            chain: Chain::new(),
            done: Vec::with_capacity(usize::from(max_size)),
            inflight: None,
            pending_used: false,
            used_since_notify: 0,
            polling: false,
            unsubmitted: 0,
            poll: AdaptivePoll::new(max_poll),
            broken: false,
            remap_on_fault: false,
        })
    }

    /// The queue index.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// The ring's state (addresses, size, indexes).
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// The ring's state, for the transport to set it up.
    pub fn queue_mut(&mut self) -> &mut Queue {
        &mut self.queue
    }

    /// The handler's completion fd: the transport wakes the service with
    /// [`Event::Completion`] when it becomes readable.
    pub fn completion_fd(&self) -> Option<RawFd> {
        self.handler.completion_fd()
    }

    /// Requests started and not completed.
    pub fn in_flight(&self) -> usize {
        self.handler.in_flight()
    }

    /// How long the transport may sleep before serving the queue again with [`Event::Timer`]
    /// even without a kick or a completion: `Some` while the handler holds work back until a
    /// time ([`QueueHandler::retry_after`], e.g. a rate limit), `None` otherwise (sleep until
    /// an fd is readable). A broken queue never asks.
    pub fn wake_after(&self) -> Option<Duration> {
        if self.broken {
            return None;
        }
        self.handler.retry_after()
    }

    /// [`Self::wake_after`] as an `epoll_wait` timeout: -1 for none, else milliseconds
    /// rounded up (at least 1, so the thread never spins).
    pub fn wake_timeout_ms(&self) -> i32 {
        match self.wake_after() {
            None => -1,
            Some(d) => {
                let ms = d.as_nanos().div_ceil(1_000_000).max(1);
                i32::try_from(ms).unwrap_or(i32::MAX)
            }
        }
    }

    /// Whether the driver broke this ring (it is not served until [`Self::reset`]).
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// For transports whose driver memory is mapped on demand (VDUSE's IOTLB): check every
    /// chain for memory that is not mapped and call `remap` before refusing it. Off by default
    /// (a chain in unmapped memory is then simply refused by the device), which saves the
    /// check on the hot path of transports whose memory table is complete (vhost-user).
    pub fn set_remap_on_fault(&mut self, on: bool) {
        self.remap_on_fault = on;
    }

    /// The features the driver accepted: the ring's EVENT_IDX follows them, and the handler
    /// is told ([`QueueHandler::driver_features`]).
    pub fn set_driver_features(&mut self, acked: u64) {
        self.queue.set_event_idx(acked & crate::F_EVENT_IDX != 0);
        self.handler.driver_features(acked);
    }

    /// Clear the handler's completion readiness without serving (a transport woken by the
    /// completion fd of a queue that has no driver memory right now, e.g. between two
    /// frontends: a level-triggered wait would otherwise spin).
    pub fn ack_completion_event(&mut self) {
        self.handler.ack_completion_event();
    }

    /// Change the largest busy-poll window.
    pub fn set_max_poll(&mut self, max: Duration) {
        self.poll.set_max(max);
    }

    /// Record every pop and completion in `block` from now on (None: keep no record).
    pub fn set_inflight(&mut self, block: Option<InflightQueue>) {
        self.inflight = block;
    }

    /// Forget the driver's ring (after [`Self::drain`]): a new driver starts from scratch.
    pub fn reset(&mut self) {
        self.queue.reset();
        self.inflight = None;
        self.broken = false;
        self.pending_used = false;
        self.polling = false;
        self.unsubmitted = 0;
        self.poll.not_measuring();
    }

    /// First service of a ring the driver started. With `record` (the queue's in-flight
    /// block), the block is brought up to date with the ring, the next avail and used
    /// indexes are set from it, and the requests a previous process left in flight are
    /// executed again; the block then records this process's requests. Without, the next used
    /// index is read from the ring. Returns whether the driver must be notified.
    pub fn activate(
        &mut self,
        mem: &Arc<GuestMem>,
        record: Option<InflightQueue>,
    ) -> Result<bool, ServiceError> {
        self.broken = false;
        let Some(mut block) = record else {
            self.inflight = None;
            let used = self.queue.used_idx(mem.as_ref(), Ordering::Acquire)?;
            self.queue.set_next_used(used.0);
            return Ok(false);
        };
        let found = block.recover(&mut self.queue, mem.as_ref())?;
        self.inflight = Some(block);
        if !found.heads.is_empty() || found.repaired != 0 {
            tracing::info!(
                queue = self.index,
                in_flight = found.heads.len(),
                repaired_used = found.repaired,
                next_avail = self.queue.next_avail(),
                next_used = self.queue.next_used(),
                "resubmitting requests in flight when the previous process stopped"
            );
        }
        self.resubmit(mem, &found.heads)
    }

    /// Execute again the requests at `heads` (no longer on the avail ring). Returns whether
    /// the driver must be notified.
    fn resubmit(&mut self, mem: &Arc<GuestMem>, heads: &[u16]) -> Result<bool, ServiceError> {
        for &head in heads {
            if head >= self.queue.size() {
                tracing::warn!(
                    queue = self.index,
                    head,
                    "in-flight record names a head outside the queue"
                );
                continue;
            }
            if !self.handler.can_start() {
                break;
            }
            self.chain.collect_head(
                mem.as_ref(),
                GuestAddress(self.queue.desc_table()),
                self.queue.size(),
                head,
            );
            self.start_chain(mem)?;
        }
        self.handler.submit()?;
        if self.handler.completion_fd().is_none() {
            self.reap(mem)?;
        }
        self.notify_decision(mem)
    }

    /// Serve the queue after `event`: complete what the handler finished, take what the
    /// driver queued, signal the driver through `notify` when it wants an interrupt, and
    /// busy-poll for the adaptive window. `remap` is asked for fresh memory when a chain or
    /// the ring refers to memory that is not mapped (it may replace `mem`).
    ///
    /// The first error breaks the ring: it is logged, returned once, and the queue is not
    /// served again until [`Self::reset`] or [`Self::activate`].
    pub fn serve(
        &mut self,
        event: Event,
        mem: &mut Arc<GuestMem>,
        remap: Remap<'_>,
        notify: &mut dyn FnMut(),
    ) -> Result<(), ServiceError> {
        if self.broken {
            return Ok(());
        }
        match event {
            Event::Kick => self.poll.woken(),
            Event::Completion => self.handler.ack_completion_event(),
            Event::Timer => {}
        }
        let mut served = self.serve_once(mem, remap, notify);
        if served.is_err() {
            // The rings themselves may sit in memory mapped since the last snapshot.
            if let Some(fresh) = remap() {
                *mem = fresh;
                served = self.serve_once(mem, remap, notify);
            }
        }
        let result = served.and_then(|wants_irq| {
            if wants_irq {
                notify();
            }
            self.busy_poll(mem, remap, notify)
        });
        if let Err(err) = &result {
            self.broken = true;
            self.polling = false;
            tracing::error!(
                queue = self.index,
                %err,
                "the driver broke the virtqueue: queue stopped until the driver resets it"
            );
        }
        if self.handler.in_flight() > 0 && self.handler.completion_fd().is_some() {
            self.poll.not_measuring();
        } else {
            self.poll.sleeping();
        }
        result
    }

    /// After [`Event::Completion`] on a ring the transport has paused (disabled, or being
    /// stopped): publish what the handler finished, take nothing new.
    pub fn complete_only(
        &mut self,
        mem: &GuestMem,
        notify: &mut dyn FnMut(),
    ) -> Result<(), ServiceError> {
        self.handler.ack_completion_event();
        if self.complete(mem)? {
            notify();
        }
        Ok(())
    }

    fn serve_once(
        &mut self,
        mem: &mut Arc<GuestMem>,
        remap: Remap<'_>,
        notify: &mut dyn FnMut(),
    ) -> Result<bool, ServiceError> {
        let completed = self.complete(mem)?;
        Ok(completed | self.process(mem, remap, notify)?)
    }

    /// Busy-poll the ring and the handler while work keeps coming within the adaptive
    /// window, with driver notifications off; then turn them back on, serving whatever
    /// arrived meanwhile. Never spins while the only thing pending is backend I/O that has
    /// a completion fd to sleep on.
    fn busy_poll(
        &mut self,
        mem: &mut Arc<GuestMem>,
        remap: Remap<'_>,
        notify: &mut dyn FnMut(),
    ) -> Result<(), ServiceError> {
        let window = self.poll.window();
        if window.is_zero() || self.waiting_on_backend() {
            return Ok(());
        }
        let started = Instant::now();
        let mut last_work = started;
        self.polling = true;
        loop {
            let before = (self.queue.next_avail(), self.queue.next_used());
            let step = self.serve_once(mem, remap, notify);
            let wants_irq = match step {
                Ok(w) => w,
                Err(err) => {
                    self.polling = false;
                    return Err(err);
                }
            };
            if wants_irq {
                notify();
            }
            let now = Instant::now();
            if (self.queue.next_avail(), self.queue.next_used()) != before {
                last_work = now;
            } else if now.duration_since(last_work) >= window {
                break;
            }
            if now.duration_since(started) >= MAX_POLL_PERIOD || self.waiting_on_backend() {
                break;
            }
            std::hint::spin_loop();
        }
        self.polling = false;
        // Sleep again: notifications on, serving whatever arrived in between.
        if self.serve_once(mem, remap, notify)? {
            notify();
        }
        Ok(())
    }

    fn waiting_on_backend(&self) -> bool {
        self.handler.in_flight() > 0 && self.handler.completion_fd().is_some()
    }

    /// Take every available chain off the ring and start it. Returns whether the driver
    /// must be notified.
    /// Within a long batch, the driver is told about completions every this many used entries
    /// (when it wants to be, per EVENT_IDX): it reaps and refills while the rest is served,
    /// instead of the two sides taking turns one batch at a time.
    fn process(
        &mut self,
        mem: &mut Arc<GuestMem>,
        remap: Remap<'_>,
        notify: &mut dyn FnMut(),
    ) -> Result<bool, ServiceError> {
        let mut retried = false;
        let mut pending_seen = false;
        loop {
            self.queue.disable_notification(mem.as_ref())?;
            let mut popped = false;
            while self.handler.can_start() {
                let Some(chain) = self.queue.pop_descriptor_chain(mem.as_ref()) else {
                    break;
                };
                popped = true;
                self.chain.collect(chain);
                if self.remap_on_fault && !retried && self.chain.faults_in(mem.as_ref()) {
                    if let Some(fresh) = remap() {
                        *mem = fresh;
                        self.queue.go_to_previous_position();
                        retried = true;
                        continue;
                    }
                }
                retried = false;
                if let Some(block) = self.inflight.as_mut() {
                    block.popped(self.chain.head());
                }
                self.start_chain(mem)?;
                self.unsubmitted += 1;
                if self.unsubmitted >= SUBMIT_BATCH {
                    self.handler.submit()?;
                    self.unsubmitted = 0;
                    if self.handler.completion_fd().is_none() {
                        // Synchronous handler: its requests are done, publish them now.
                        self.reap(mem)?;
                    }
                }
                if self.used_since_notify >= NOTIFY_EVERY && self.notify_decision(mem)? {
                    notify();
                }
            }
            if pending_seen && !popped {
                // The ring said requests were pending, yet none could be taken: the avail
                // index is more than a queue ahead or the ring is not in memory. Looping
                // again would spin forever.
                return Err(virtio_queue::Error::InvalidAvailRingIndex.into());
            }
            self.handler.submit()?;
            self.unsubmitted = 0;
            if self.handler.completion_fd().is_none() {
                self.reap(mem)?;
            }
            if !self.handler.can_start() || self.polling {
                // Out of slots: the rest stays on the ring until completions free some.
                // Polling: notifications stay off, the poll loop comes back by itself.
                break;
            }
            if !self.queue.enable_notification(mem.as_ref())? {
                break;
            }
            pending_seen = true;
        }
        self.notify_decision(mem)
    }

    fn start_chain(&mut self, mem: &Arc<GuestMem>) -> Result<(), ServiceError> {
        match self.handler.start(&self.chain, mem) {
            Outcome::Done { used_len } => self.publish_used(mem, self.chain.head(), used_len),
            Outcome::Started => Ok(()),
        }
    }

    /// Publish what the handler finished. Returns whether the driver must be notified.
    fn complete(&mut self, mem: &GuestMem) -> Result<bool, ServiceError> {
        self.reap(mem)?;
        self.notify_decision(mem)
    }

    /// Publish what the handler finished (the notification is decided by the caller).
    fn reap(&mut self, mem: &GuestMem) -> Result<(), ServiceError> {
        self.handler.reap(&mut self.done);
        let mut done = std::mem::take(&mut self.done);
        let mut result = Ok(());
        for c in done.drain(..) {
            if result.is_ok() {
                result = self.publish_used(mem, c.head, c.used_len);
            }
        }
        self.done = done;
        result
    }

    /// Wait until every request in flight has completed and is in the used ring. Returns
    /// whether the driver must be notified.
    pub fn drain(&mut self, mem: &GuestMem) -> Result<bool, ServiceError> {
        let mut wants_irq = false;
        while self.handler.in_flight() > 0 {
            self.handler.wait()?;
            wants_irq |= self.complete(mem)?;
        }
        Ok(wants_irq | self.notify_decision(mem)?)
    }

    fn notify_decision(&mut self, mem: &GuestMem) -> Result<bool, ServiceError> {
        self.used_since_notify = 0;
        if !std::mem::take(&mut self.pending_used) {
            return Ok(false);
        }
        Ok(self.queue.needs_notification(mem)?)
    }

    /// Add the used entry for `head`, recording it in the in-flight block before and after.
    fn publish_used(
        &mut self,
        mem: &GuestMem,
        head: u16,
        used_len: u32,
    ) -> Result<(), ServiceError> {
        if let Some(block) = self.inflight.as_mut() {
            block.completing(head);
        }
        self.queue.add_used(mem, head, used_len)?;
        if let Some(block) = self.inflight.as_mut() {
            block.used(head, self.queue.next_used());
        }
        self.pending_used = true;
        self.used_since_notify += 1;
        Ok(())
    }
}

#[cfg(test)]
#[path = "service_tests.rs"]
mod tests;
