//! What the control thread and the queue threads share: the VDUSE device, the in-flight log,
//! the IOTLB, and each queue's service behind its mutex.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use vduse::{IotlbMemory, VduseDevice};
use virtiod_core::{GuestMem, QueueService};
use vmm_sys_util::eventfd::EventFd;

use crate::state::StateLog;

/// State shared by the control thread and the queue threads.
pub(crate) struct Shared {
    pub dev: VduseDevice,
    pub log: StateLog,
    pub iotlb: Mutex<IotlbMemory>,
    pub queues: Vec<QueueHandle>,
    pub stop: AtomicBool,
    pub stop_evt: EventFd,
}

pub(crate) type Mem = GuestMem;

/// A queue's state; `mem` is set (and the ring in `svc` set up) while the driver has it
/// running.
pub(crate) struct QueueCtx {
    pub svc: QueueService,
    pub mem: Option<Arc<Mem>>,
}

/// What the control thread and the queue thread share for one queue.
pub(crate) struct QueueHandle {
    pub ctx: Mutex<QueueCtx>,
    /// Given to the kernel with VDUSE_VQ_SETUP_KICKFD.
    pub kick: EventFd,
    /// Wakes the thread to re-check `Shared::stop`.
    pub wake: EventFd,
}

pub(crate) fn lock(q: &QueueHandle) -> std::sync::MutexGuard<'_, QueueCtx> {
    q.ctx.lock().unwrap_or_else(|e| e.into_inner())
}
