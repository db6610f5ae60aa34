//! VDUSE transport: this process *is* the virtio device on the kernel's vDPA bus. It serves
//! any [`virtiod_core::Device`] (the kernel accepts block and, since 6.10, net devices).
//!
//! Attached to `virtio_vdpa` the host gets `/dev/vdX`; attached to `vhost_vdpa` a VM (or a
//! user-space driver) gets `/dev/vhost-vdpa-N`. The request path is the core's
//! ([`virtiod_core::QueueService`]), as for vhost-user: one thread per queue, each with its
//! own device handler (for virtio-blk: its own backend I/O context); a control thread answers
//! the kernel's messages (status changes, queue state, IOTLB invalidations) and starts/stops
//! the queues.
//!
//! Driver memory is the VDUSE IOTLB (IOVA space) mapped with [`vduse::IotlbMemory`]: mapped
//! at DRIVER_OK, and again on demand when a request refers to an IOVA not mapped yet
//! (virtio-vdpa maps its bounce buffer lazily).

#![deny(missing_docs)]

mod control;
mod device;
mod queue;
mod shared;
mod state;

pub use device::{Attach, VduseOptions, VduseServer};

/// Errors of the VDUSE transport. Each says what failed and what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// VDUSE itself failed (module missing, permission, name in use...).
    #[error(transparent)]
    Vduse(#[from] vduse::Error),
    /// The vDPA bus failed (netlink, sysfs).
    #[error(transparent)]
    Vdpa(#[from] vduse::vdpa::VdpaError),
    /// The device failed (setting up a queue, or stopping).
    #[error(transparent)]
    Device(#[from] virtiod_core::DeviceError),
    /// The device node did not appear.
    #[error("{0}")]
    Attach(String),
    /// A thread or event fd could not be created.
    #[error("{what}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}
