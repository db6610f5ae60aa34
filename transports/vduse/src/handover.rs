//! Handing a served device over to another process (an upgrade in place) without the kernel
//! ever seeing `/dev/vduse/NAME` closed: [`VduseServer::quiesce`] stops serving and completes
//! what is in flight, the open device fd ([`VduseServer::device_fd`]) goes to the new process,
//! which serves it with [`VduseServer::import`]; the old one then forgets the device
//! ([`VduseServer::handed_over`]) or, if the new process failed, serves it again
//! ([`VduseServer::resume`]).
//!
//! Nothing of the rings needs to travel: the kernel keeps the queues' addresses, the driver's
//! features and status, and the in-flight log (a file in the state directory) holds where
//! each queue stands. The new process sets the queues up exactly as after a restart.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vduse::VduseDevice;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtiod_core::Device;

use super::{check_net_features, device_config, existing_log, VduseOptions, VduseServer};
use crate::shared::lock;
use crate::Error;

impl VduseServer {
    /// Stop serving for a hand-over: stop the queue threads and the control thread, complete
    /// every request in flight into the used rings (with an interrupt where the driver wants
    /// one), and forget the queues' set-up. The device stays as it is: not reset, not
    /// detached, still open; kicks and kernel messages wait for whoever serves it next.
    pub fn quiesce(&mut self) -> Result<(), Error> {
        let shared = self
            .shared
            .clone()
            .ok_or_else(|| Error::Attach(format!("device {} is not being served", self.name)))?;
        shared.stop.store(true, Ordering::Release);
        let _ = shared.stop_evt.write(1);
        for q in &shared.queues {
            let _ = q.wake.write(1);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for (index, handle) in shared.queues.iter().enumerate() {
            let mut ctx = lock(handle);
            if let Some(mem) = ctx.mem.take() {
                match ctx.svc.drain(mem.as_ref()) {
                    Ok(true) => {
                        let _ = shared.dev.inject_vq_irq(index as u32);
                    }
                    Ok(false) => {}
                    // Still recorded in the in-flight log: whoever serves next executes it.
                    Err(e) => tracing::warn!(queue = index, %e, "draining before a hand-over"),
                }
            }
            ctx.svc.reset();
        }
        tracing::info!(name = %self.name, "quiesced for a hand-over");
        Ok(())
    }

    /// Serve again after [`Self::quiesce`] (the hand-over failed): the queues are set up from
    /// the kernel's view and the in-flight log, as after a restart, so requests a failed new
    /// process left in flight are executed again.
    pub fn resume(&mut self) -> Result<(), Error> {
        let shared = self
            .shared
            .clone()
            .ok_or_else(|| Error::Attach(format!("device {} was handed over", self.name)))?;
        if !self.threads.is_empty() {
            return Ok(()); // not quiesced
        }
        shared.stop.store(false, Ordering::Release);
        let _ = shared.stop_evt.read();
        self.spawn_threads(&shared, true)?;
        tracing::info!(name = %self.name, "serving again after a failed hand-over");
        Ok(())
    }

    /// The open `/dev/vduse/NAME` to hand over (send it with SCM_RIGHTS).
    pub fn device_fd(&self) -> Option<BorrowedFd<'_>> {
        self.shared.as_ref().map(|s| s.dev.as_fd())
    }

    /// Another process serves the device now (after [`Self::quiesce`]): close this process's
    /// descriptors and forget the device without detaching, resetting or destroying it.
    pub fn handed_over(mut self) {
        self.created = false;
        self.attached = false;
        self.device.set_config_notifier(None);
        drop(self.shared.take());
    }

    /// Serve the existing device `opts.name` whose open fd another virtiod handed over (after
    /// its [`Self::quiesce`]), with the in-flight log it kept in `opts.state_dir`: the queues
    /// resume from the kernel's view, as after a restart, but `/dev/vduse/NAME` is never
    /// closed, so no kernel message goes unanswered for long.
    pub fn import(
        device: Arc<dyn Device>,
        opts: &VduseOptions,
        fd: OwnedFd,
    ) -> Result<Self, Error> {
        if device.device_type() == VIRTIO_ID_NET {
            check_net_features(device.features())?;
        }
        let (_, id) = device_config(device.as_ref(), opts);
        let dev = VduseDevice::from_fd(&opts.name, fd)?;
        let log = existing_log(opts, id)?;
        tracing::info!(name = %opts.name, "taking over the VDUSE device");
        Self::serve_opened(device, opts, dev, log, true)
    }
}
