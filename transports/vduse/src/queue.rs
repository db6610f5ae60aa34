//! One thread per virtqueue: kicks and handler completions in, used ring and interrupts out.
//! The queue itself is served by the core's [`QueueService`].

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtiod_core::Event;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::shared::{lock, QueueCtx, Shared};

const TOKEN_KICK: u64 = 0;
const TOKEN_COMPLETION: u64 = 1;
const TOKEN_WAKE: u64 = 2;

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
    if let Some(fd) = lock(handle).svc.completion_fd() {
        add(fd, TOKEN_COMPLETION)?;
    }
    let mut events = vec![EpollEvent::default(); 4];
    // Set up: from here on the thread reads the driver's rings.
    virtiod_core::confine::enter(virtiod_core::confine::ThreadRole::Queue);
    // A handler that holds requests back (a rate limit) asks to be served again after a
    // while even if no fd becomes readable.
    let mut timeout_ms = -1;
    loop {
        let n = match epoll.wait(timeout_ms, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let mut event = if n == 0 {
            Event::Timer
        } else {
            Event::Completion
        };
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_KICK => {
                    let _ = handle.kick.read();
                    event = Event::Kick;
                }
                TOKEN_WAKE => {
                    let _ = handle.wake.read();
                    event = Event::Kick;
                }
                _ => {}
            }
        }
        if shared.stop.load(Ordering::Acquire) {
            return Ok(());
        }
        timeout_ms = service(shared, index, event);
    }
}

/// Serve the queue after `event`: the core completes what the handler finished and starts
/// what the driver queued, re-mapping the IOTLB when a chain or the ring is not mapped.
/// Returns how long the thread may sleep without an event (`epoll_wait` timeout, -1: until
/// an fd is readable).
pub(crate) fn service(shared: &Arc<Shared>, index: usize, event: Event) -> i32 {
    let handle = &shared.queues[index];
    let mut guard = lock(handle);
    let QueueCtx { svc, mem } = &mut *guard;
    let Some(mem) = mem.as_mut() else {
        if event == Event::Completion {
            svc.ack_completion_event(); // level-triggered: clear it or the thread spins
        }
        return -1;
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
    let mut irq = || {
        if let Err(e) = shared.dev.inject_vq_irq(index as u32) {
            tracing::warn!(queue = index, %e, "injecting an interrupt failed");
        }
    };
    // A broken ring is logged once by the core and stays quiet until the driver resets it.
    let _ = svc.serve(event, mem, &mut remap, &mut irq);
    svc.wake_timeout_ms()
}
