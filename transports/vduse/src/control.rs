//! The control thread: answers the kernel's VDUSE messages and starts/stops the queues.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vduse::{Request, Response, VqState};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::device::Shared;
use crate::queue::{lock, Mem};

/// VIRTIO_CONFIG_S_DRIVER_OK
const STATUS_DRIVER_OK: u8 = 4;
/// VIRTIO_RING_F_EVENT_IDX
const EVENT_IDX: u64 = 1 << 29;

pub(crate) fn run(shared: &Arc<Shared>, resume: bool) {
    if resume && shared.log.status() & STATUS_DRIVER_OK != 0 {
        if let Err(e) = resume_queues(shared) {
            tracing::error!(%e, "resuming the queues after a restart failed");
        }
    }
    let mut fds = [
        libc::pollfd {
            fd: shared.dev.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: shared.stop_evt.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    while !shared.stop.load(Ordering::Acquire) {
        if let Err(e) = poll(&mut fds) {
            tracing::error!(%e, "control thread: poll failed");
            return;
        }
        if fds[1].revents != 0 {
            let _ = shared.stop_evt.read();
            continue;
        }
        if fds[0].revents == 0 {
            continue;
        }
        let msg = match shared.dev.try_read_request() {
            Ok(Some(msg)) => msg,
            Ok(None) => continue,
            Err(e) => {
                tracing::error!(%e, "control thread: reading a VDUSE message failed");
                return;
            }
        };
        let response = handle(shared, msg.request_id, msg.request);
        if let Err(e) = shared.dev.write_response(&response) {
            tracing::error!(%e, "control thread: answering a VDUSE message failed");
        }
    }
}

fn poll(fds: &mut [libc::pollfd; 2]) -> std::io::Result<()> {
    loop {
        // SAFETY: `fds` is a valid array of two pollfd structs for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n >= 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn handle(shared: &Arc<Shared>, id: u32, request: Request) -> Response {
    match request {
        Request::SetStatus { status } => {
            tracing::debug!(status, "SET_STATUS");
            shared.log.set_status(status);
            if status == 0 {
                stop_queues(shared);
                for index in 0..shared.queues.len() {
                    shared.log.queue(index).reset(0, 0);
                }
                shared
                    .iotlb
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clear();
            } else if status & STATUS_DRIVER_OK != 0 {
                if let Err(e) = start_queues(shared) {
                    tracing::error!(%e, "starting the queues failed");
                    return Response::failed(id);
                }
            }
            Response::ok(id)
        }
        Request::GetVqState { index } => {
            let avail_index = shared
                .queues
                .get(index as usize)
                .and_then(|q| lock(q).queue.as_ref().map(|q| q.next_avail()))
                .or_else(|| shared.dev.vq_info(index).ok().map(|i| i.avail_index))
                .unwrap_or(0);
            Response::vq_state(id, index, VqState::Split { avail_index })
        }
        Request::UpdateIotlb { start, last } => {
            // Take the new snapshot first, then hand it to the queues: never hold the IOTLB
            // lock while taking a queue lock (queue threads take them the other way round).
            // Re-map what is still (or newly) there at once: the kernel updates its IOTLB
            // before telling us, and the rings must stay reachable (vhost-vdpa drivers map
            // their buffers after DRIVER_OK, which invalidates everything).
            let fresh = {
                let mut iotlb = shared.iotlb.lock().unwrap_or_else(|e| e.into_inner());
                iotlb.invalidate(start, last);
                if let Err(e) = iotlb.map_range(&shared.dev, 0, u64::MAX) {
                    tracing::warn!(%e, "re-mapping driver memory failed");
                }
                iotlb.memory()
            };
            if let Ok(mem) = fresh {
                for q in &shared.queues {
                    let mut ctx = lock(q);
                    if ctx.mem.is_some() {
                        ctx.mem = Some(mem.clone());
                    }
                }
            }
            Response::ok(id)
        }
        Request::Unknown(kind) => {
            tracing::warn!(kind, "unknown VDUSE message");
            Response::failed(id)
        }
    }
}

fn current_memory(shared: &Shared) -> Result<Arc<Mem>, vduse::Error> {
    let mut iotlb = shared.iotlb.lock().unwrap_or_else(|e| e.into_inner());
    iotlb.map_range(&shared.dev, 0, u64::MAX)?;
    iotlb.memory()
}

/// DRIVER_OK: build each ready queue from the kernel's view of it and start serving.
fn start_queues(shared: &Arc<Shared>) -> Result<(), vduse::Error> {
    let features = shared.dev.get_features()?;
    let mem = current_memory(shared)?;
    for (index, handle) in shared.queues.iter().enumerate() {
        let info = shared.dev.vq_info(index as u32)?;
        if !info.ready {
            continue;
        }
        let Some(queue) = build_queue(shared, &mem, &info, features) else {
            tracing::error!(queue = index, ?info, "the driver's virtqueue is not usable");
            continue;
        };
        {
            let mut ctx = lock(handle);
            if ctx.queue.is_some() {
                continue; // already running (DRIVER_OK set again)
            }
            shared
                .log
                .queue(index)
                .reset(queue.next_avail(), queue.next_used());
            ctx.queue = Some(queue);
            ctx.mem = Some(mem.clone());
        }
        shared.dev.set_vq_kickfd(index as u32, Some(&handle.kick))?;
        // Serve whatever the driver queued before we listened for kicks.
        let _ = handle.kick.write(1);
        tracing::debug!(queue = index, size = info.num, "queue started");
    }
    Ok(())
}

/// After a restart on a device the driver is using: rebuild each queue from the kernel's
/// addresses and our log, complete what the previous process left in flight, and kick once
/// (kicks sent while no process listened are lost).
fn resume_queues(shared: &Arc<Shared>) -> Result<(), vduse::Error> {
    let features = shared.dev.get_features()?;
    let mem = current_memory(shared)?;
    for (index, handle) in shared.queues.iter().enumerate() {
        let info = shared.dev.vq_info(index as u32)?;
        if !info.ready {
            continue;
        }
        let qlog = shared.log.queue(index);
        let resumed = vduse::VqInfo {
            avail_index: qlog.last_avail(),
            ..info
        };
        let Some(mut queue) = build_queue(shared, &mem, &resumed, features) else {
            tracing::error!(queue = index, ?info, "the driver's virtqueue is not usable");
            continue;
        };
        let num = u64::from(info.num.max(1));
        let read_u16 = |addr: u64| {
            mem.read_obj::<u16>(GuestAddress(addr))
                .ok()
                .map(u16::from_le)
        };
        let avail_idx = read_u16(info.driver_addr + 2).unwrap_or(resumed.avail_index);
        let heads = qlog.recover(
            queue.next_used(),
            |i| read_u16(info.device_addr + 4 + 8 * (u64::from(i) % num)),
            avail_idx,
            |i| read_u16(info.driver_addr + 4 + 2 * (u64::from(i) % num)),
        );
        tracing::info!(
            queue = index,
            in_flight = heads.len(),
            next_avail = queue.next_avail(),
            next_used = queue.next_used(),
            "resuming queue after a restart"
        );
        let mut ctx = lock(handle);
        if let Err(e) = ctx.worker.resubmit(&mut queue, &mem, &heads) {
            tracing::warn!(queue = index, %e, "resubmitting in-flight requests failed");
        }
        ctx.queue = Some(queue);
        ctx.mem = Some(mem.clone());
        drop(ctx);
        shared.dev.set_vq_kickfd(index as u32, Some(&handle.kick))?;
        // Used entries may have been published without an interrupt before the crash.
        let _ = shared.dev.inject_vq_irq(index as u32);
        let _ = handle.kick.write(1);
    }
    Ok(())
}

fn build_queue(shared: &Shared, mem: &Mem, info: &vduse::VqInfo, features: u64) -> Option<Queue> {
    let mut q = Queue::new(shared.cfg.queue_size).ok()?;
    let size = u16::try_from(info.num).ok()?;
    q.try_set_size(size).ok()?;
    q.try_set_desc_table_address(GuestAddress(info.desc_addr))
        .ok()?;
    q.try_set_avail_ring_address(GuestAddress(info.driver_addr))
        .ok()?;
    q.try_set_used_ring_address(GuestAddress(info.device_addr))
        .ok()?;
    q.set_event_idx(features & EVENT_IDX != 0);
    q.set_next_avail(info.avail_index);
    let used_idx: u16 = mem
        .read_obj(GuestAddress(info.device_addr).checked_add(2)?)
        .ok()?;
    q.set_next_used(u16::from_le(used_idx));
    q.set_ready(true);
    q.is_valid(mem).then_some(q)
}

/// Reset or shutdown: complete everything in flight, then forget the queues.
pub(crate) fn stop_queues(shared: &Shared) {
    for (index, handle) in shared.queues.iter().enumerate() {
        let mut ctx = lock(handle);
        let crate::queue::QueueCtx { worker, queue, mem } = &mut *ctx;
        if let (Some(q), Some(m)) = (queue.as_mut(), mem.as_ref()) {
            match worker.drain(q, m.as_ref()) {
                Ok(true) => {
                    let _ = shared.dev.inject_vq_irq(index as u32);
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(queue = index, %e, "draining failed"),
            }
        }
        ctx.queue = None;
        ctx.mem = None;
        drop(ctx);
        let _ = shared.dev.set_vq_kickfd(index as u32, None);
    }
}
