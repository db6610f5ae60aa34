//! The control thread: answers the kernel's VDUSE messages and starts/stops the queues.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vduse::{Request, Response, VqState};
use virtio_queue::{Queue, QueueT};
use virtiod_core::STATUS_DRIVER_OK;
use vm_memory::{Address, Bytes, GuestAddress};

use crate::shared::{lock, Mem, Shared};

pub(crate) fn run(shared: &Arc<Shared>, resume: bool) {
    virtiod_core::confine::enter(virtiod_core::confine::ThreadRole::Message);
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
                    if let Some(mut block) = shared.log.queue(index) {
                        block.initialise(0);
                    }
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
                .and_then(|q| {
                    let ctx = lock(q);
                    ctx.mem.is_some().then(|| ctx.svc.queue().next_avail())
                })
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

/// DRIVER_OK: set up each ready queue from the kernel's view of it and start serving.
fn start_queues(shared: &Arc<Shared>) -> Result<(), vduse::Error> {
    let features = shared.dev.get_features()?;
    let mem = current_memory(shared)?;
    for (index, handle) in shared.queues.iter().enumerate() {
        let info = shared.dev.vq_info(index as u32)?;
        if !info.ready {
            continue;
        }
        {
            let mut ctx = lock(handle);
            if ctx.mem.is_some() {
                continue; // already running (DRIVER_OK set again)
            }
            if !set_up_queue(ctx.svc.queue_mut(), &mem, &info) {
                tracing::error!(queue = index, ?info, "the driver's virtqueue is not usable");
                continue;
            }
            ctx.svc.set_driver_features(features);
            let mut block = shared.log.queue(index);
            if let Some(block) = block.as_mut() {
                block.initialise(ctx.svc.queue().next_used());
            }
            ctx.svc.set_inflight(block);
            ctx.mem = Some(mem.clone());
        }
        shared.dev.set_vq_kickfd(index as u32, Some(&handle.kick))?;
        // Serve whatever the driver queued before we listened for kicks.
        let _ = handle.kick.write(1);
        tracing::debug!(queue = index, size = info.num, "queue started");
    }
    Ok(())
}

/// After a restart on a device the driver is using: set each queue up from the kernel's
/// addresses, let the core recover it from our log (it executes again what the previous
/// process left in flight), and kick once (kicks sent while no process listened are lost).
fn resume_queues(shared: &Arc<Shared>) -> Result<(), vduse::Error> {
    let features = shared.dev.get_features()?;
    let mem = current_memory(shared)?;
    for (index, handle) in shared.queues.iter().enumerate() {
        let info = shared.dev.vq_info(index as u32)?;
        if !info.ready {
            continue;
        }
        let mut ctx = lock(handle);
        if !set_up_queue(ctx.svc.queue_mut(), &mem, &info) {
            tracing::error!(queue = index, ?info, "the driver's virtqueue is not usable");
            continue;
        }
        ctx.svc.set_driver_features(features);
        match ctx.svc.activate(&mem, shared.log.queue(index)) {
            Ok(_) => tracing::info!(
                queue = index,
                next_avail = ctx.svc.queue().next_avail(),
                next_used = ctx.svc.queue().next_used(),
                "resuming queue after a restart"
            ),
            Err(e) => tracing::warn!(queue = index, %e, "recovering the queue failed"),
        }
        ctx.mem = Some(mem.clone());
        drop(ctx);
        shared.dev.set_vq_kickfd(index as u32, Some(&handle.kick))?;
        // Used entries may have been published without an interrupt before the crash.
        let _ = shared.dev.inject_vq_irq(index as u32);
        let _ = handle.kick.write(1);
    }
    Ok(())
}

/// Set `q` up from the kernel's view of the ring. Returns whether it is usable.
/// (EVENT_IDX follows the driver's features: `QueueService::set_driver_features`.)
fn set_up_queue(q: &mut Queue, mem: &Mem, info: &vduse::VqInfo) -> bool {
    let Ok(size) = u16::try_from(info.num) else {
        return false;
    };
    let set = q
        .try_set_size(size)
        .and_then(|()| q.try_set_desc_table_address(GuestAddress(info.desc_addr)))
        .and_then(|()| q.try_set_avail_ring_address(GuestAddress(info.driver_addr)))
        .and_then(|()| q.try_set_used_ring_address(GuestAddress(info.device_addr)));
    if set.is_err() {
        return false;
    }
    q.set_next_avail(info.avail_index);
    let used_idx = GuestAddress(info.device_addr)
        .checked_add(2)
        .and_then(|a| mem.read_obj::<u16>(a).ok());
    let Some(used_idx) = used_idx else {
        return false;
    };
    q.set_next_used(u16::from_le(used_idx));
    q.set_ready(true);
    q.is_valid(mem)
}

/// Reset or shutdown: complete everything in flight, then forget the queues.
pub(crate) fn stop_queues(shared: &Shared) {
    for (index, handle) in shared.queues.iter().enumerate() {
        let mut ctx = lock(handle);
        if let Some(m) = ctx.mem.take() {
            match ctx.svc.drain(m.as_ref()) {
                Ok(true) => {
                    let _ = shared.dev.inject_vq_irq(index as u32);
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(queue = index, %e, "draining failed"),
            }
        }
        ctx.svc.reset();
        drop(ctx);
        let _ = shared.dev.set_vq_kickfd(index as u32, None);
    }
}
