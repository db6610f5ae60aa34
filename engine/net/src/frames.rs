//! The frames waiting for one port's receive buffers, shared by every backend: a bounded
//! queue (beyond [`PORT_QUEUE_FRAMES`] frames, new ones are dropped and counted) and the rx
//! eventfd, signalled for new frames only while the rx queue holds receive buffers.
//!
//! A frame is queued as its driver can take it ([`Finish`]): as it is when the driver
//! accepted the offloads its header uses, else with the checksum completed or cut into TCP
//! segments here, in software.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::PortStats;
use crate::offload::{complete_checksum, Finish, Segments};
use crate::{NetError, NET_HDR_LEN};

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
    /// The features the port's driver accepted (which offloads it takes).
    guest_features: u64,
}

impl Queue {
    /// An empty buffer at the back of the queue, or None (counted) if the queue is full.
    fn slot(&mut self, stats: &PortStats) -> Option<&mut Vec<u8>> {
        if self.frames.len() >= PORT_QUEUE_FRAMES {
            PortStats::bump(&stats.rx_queue_full);
            return None;
        }
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.clear();
        self.frames.push_back(buf);
        self.frames.back_mut()
    }
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

    /// Queue `frame` (a virtio-net header and the packet) as the driver can take it; dropped
    /// and counted when the queue is full (`stats.rx_queue_full`) or when it needs software
    /// segmentation and is not a TCP frame that can be cut (`stats.rx_offload_dropped`).
    pub(crate) fn push(&self, frame: &[u8], stats: &PortStats) {
        if frame.len() < NET_HDR_LEN {
            PortStats::bump(&stats.rx_offload_dropped);
            return;
        }
        let mut q = locked(&self.queue);
        let before = q.frames.len();
        match Finish::of(frame, q.guest_features) {
            Finish::AsIs { flags } => {
                if let Some(buf) = q.slot(stats) {
                    buf.extend_from_slice(frame);
                    buf[0] = flags;
                }
            }
            Finish::Checksum => {
                if let Some(buf) = q.slot(stats) {
                    buf.extend_from_slice(frame);
                    if !complete_checksum(buf) {
                        if let Some(buf) = q.frames.pop_back() {
                            q.spare.push(buf);
                        }
                        PortStats::bump(&stats.rx_offload_dropped);
                    }
                }
            }
            Finish::Segment => match Segments::new(frame, q.guest_features) {
                Some(segs) => {
                    PortStats::bump(&stats.rx_segmented);
                    for i in 0..segs.count() {
                        let Some(buf) = q.slot(stats) else { break };
                        segs.build(i, buf);
                    }
                }
                None => PortStats::bump(&stats.rx_offload_dropped),
            },
        }
        if q.ready && q.frames.len() > before {
            self.signal();
        }
    }

    /// Tell which features the port's driver accepted (frames queued from now on follow
    /// them).
    pub(crate) fn set_guest_features(&self, features: u64) {
        locked(&self.queue).guest_features = features;
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
