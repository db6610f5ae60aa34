//! One thread per virtqueue: kicks and backend completions in, used ring and interrupts out.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use virtiod_blk::QueueWorker;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::device::Shared;

pub(crate) type Mem = GuestMemoryMmap<()>;

/// A queue's engine state; `queue` and `mem` are set while the driver has it running.
pub(crate) struct QueueCtx {
    pub worker: QueueWorker<Mem>,
    pub queue: Option<Queue>,
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

const TOKEN_KICK: u64 = 0;
const TOKEN_COMPLETION: u64 = 1;
const TOKEN_WAKE: u64 = 2;

pub(crate) fn lock(q: &QueueHandle) -> std::sync::MutexGuard<'_, QueueCtx> {
    q.ctx.lock().unwrap_or_else(|e| e.into_inner())
}

/// The queue thread's loop.
pub(crate) fn run(shared: &Arc<Shared>, index: usize) {
    if let Err(e) = serve(shared, index) {
        tracing::error!(queue = index, %e, "queue thread stopped");
    }
}

fn serve(shared: &Arc<Shared>, index: usize) -> std::io::Result<()> {
    let handle = &shared.queues[index];
    let epoll = Epoll::new()?;
    let add = |fd: i32, token: u64| {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
    };
    add(handle.kick.as_raw_fd(), TOKEN_KICK)?;
    add(handle.wake.as_raw_fd(), TOKEN_WAKE)?;
    if let Some(fd) = lock(handle).worker.completion_fd() {
        add(fd, TOKEN_COMPLETION)?;
    }
    let mut events = vec![EpollEvent::default(); 4];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_KICK => {
                    let _ = handle.kick.read();
                }
                TOKEN_WAKE => {
                    let _ = handle.wake.read();
                }
                _ => lock(handle).worker.ack_completion_event(),
            }
        }
        if shared.stop.load(Ordering::Acquire) {
            return Ok(());
        }
        service(shared, index);
    }
}

/// Complete what the backend finished and start what the driver queued.
pub(crate) fn service(shared: &Arc<Shared>, index: usize) {
    let handle = &shared.queues[index];
    let mut guard = lock(handle);
    let QueueCtx { worker, queue, mem } = &mut *guard;
    let (Some(queue), Some(mem)) = (queue.as_mut(), mem.as_mut()) else {
        return;
    };
    // Another queue may already have mapped what this one misses: hand out the newest
    // snapshot whenever it differs from the one this queue is using.
    let mut using = Arc::as_ptr(mem);
    let mut remap = || {
        let mut iotlb = shared.iotlb.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = iotlb.map_range(&shared.dev, 0, u64::MAX) {
            tracing::warn!(%e, "mapping driver memory failed");
        }
        let newest = iotlb.memory().ok()?;
        if std::ptr::eq(Arc::as_ptr(&newest), using) {
            return None;
        }
        using = Arc::as_ptr(&newest);
        Some(newest)
    };
    let mut result = worker
        .process_completions(queue, mem.as_ref())
        .and_then(|n1| Ok(n1 | worker.process_queue_remap(queue, mem, &mut remap)?));
    if result.is_err() {
        // The rings themselves may sit in memory mapped since our last snapshot.
        if let Some(fresh) = remap() {
            *mem = fresh;
            result = worker
                .process_completions(queue, mem.as_ref())
                .and_then(|n1| Ok(n1 | worker.process_queue_remap(queue, mem, &mut remap)?));
        }
    }
    let irq = || {
        if let Err(e) = shared.dev.inject_vq_irq(index as u32) {
            tracing::warn!(queue = index, %e, "injecting an interrupt failed");
        }
    };
    match result {
        Ok(true) => irq(),
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(queue = index, %e, "the driver's virtqueue is broken");
            return;
        }
    }
    if !shared.poll.is_zero() {
        let polled = worker.busy_poll(queue, mem, shared.poll, &mut remap, &mut { irq });
        if let Err(e) = polled {
            tracing::warn!(queue = index, %e, "the driver's virtqueue is broken");
        }
    }
}
