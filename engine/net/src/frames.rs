//! The frames waiting for one port's receive buffers, shared by every backend: a bounded
//! queue (beyond [`PORT_QUEUE_FRAMES`] frames, new ones are dropped and counted) and the rx
//! eventfd, signalled for new frames only while the rx queue holds receive buffers.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::PortStats;
use crate::NetError;

/// Frames waiting per port for receive buffers; more are dropped.
pub const PORT_QUEUE_FRAMES: usize = 256;

pub(crate) fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Default)]
struct Queue {
    frames: VecDeque<Vec<u8>>,
    /// Emptied frame buffers, reused for the next frames.
    spare: Vec<Vec<u8>>,
    /// The rx queue holds receive buffers (signal the event for new frames).
    ready: bool,
}

/// The bounded queue of frames for one port's driver, and its rx eventfd.
#[derive(Debug)]
pub(crate) struct RxFrames {
    queue: Mutex<Queue>,
    event: EventFd,
}

impl RxFrames {
    pub(crate) fn new() -> Result<Self, NetError> {
        Ok(Self {
            queue: Mutex::new(Queue::default()),
            event: EventFd::new(EFD_NONBLOCK).map_err(NetError::EventFd)?,
        })
    }

    /// Frames waiting.
    pub(crate) fn len(&self) -> usize {
        locked(&self.queue).frames.len()
    }

    /// Queue `frame` (dropped and counted in `stats.rx_queue_full` when the queue is full).
    pub(crate) fn push(&self, frame: &[u8], stats: &PortStats) {
        let mut q = locked(&self.queue);
        if q.frames.len() >= PORT_QUEUE_FRAMES {
            drop(q);
            PortStats::bump(&stats.rx_queue_full);
            return;
        }
        let mut buf = q.spare.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(frame);
        q.frames.push_back(buf);
        if q.ready {
            self.signal();
        }
    }

    /// See [`crate::NetBackend::receive`].
    pub(crate) fn pop(&self, frame: &mut Vec<u8>) -> bool {
        let mut q = locked(&self.queue);
        let Some(mut next) = q.frames.pop_front() else {
            return false;
        };
        std::mem::swap(frame, &mut next);
        if q.spare.len() < PORT_QUEUE_FRAMES {
            q.spare.push(next);
        }
        true
    }

    /// See [`crate::NetBackend::rx_event`].
    pub(crate) fn event(&self) -> &EventFd {
        &self.event
    }

    /// See [`crate::NetBackend::set_rx_ready`].
    pub(crate) fn set_ready(&self, ready: bool) {
        let mut q = locked(&self.queue);
        if ready && !q.ready && !q.frames.is_empty() {
            self.signal();
        }
        q.ready = ready;
    }

    fn signal(&self) {
        if let Err(err) = self.event.write(1) {
            tracing::warn!(%err, "cannot signal the rx queue");
        }
    }
}
