//! The device core of virtiod: what every virtio device and every transport share.
//!
//! A *device* ([`Device`]) says what it is (virtio device id, feature bits, config space,
//! queue count and size) and hands out one [`QueueHandler`] per queue, which executes the
//! requests of that queue. A *transport* (VDUSE, vhost-user) owns the driver's memory and the
//! rings, and serves each queue through one [`QueueService`]: the only code that takes chains
//! off the avail ring, suppresses and sends notifications (EVENT_IDX), busy-polls adaptively,
//! re-maps driver memory on a fault (VDUSE's IOTLB), records requests in flight so that a
//! restarted daemon executes them again ([`inflight`]), and stops a queue whose driver broke
//! the ring.
//!
//! ```text
//! kick ─► QueueService::serve ─► pop chain ─► Chain ─► QueueHandler::start ─► (backend)
//!                                                                               │
//! interrupt ◄─ notify ◄─ used ring ◄─ QueueService ◄─ QueueHandler::reap ◄──────┘
//! ```
//!
//! Adding a device: implement [`Device`] and [`QueueHandler`] (parse the [`Chain`], do the
//! work, report completions); both transports then serve it unchanged.
#![deny(missing_docs)]

pub mod chain;
pub mod confine;
mod device;
pub mod inflight;
mod poll;
mod service;

pub use chain::{Chain, ChainDesc};
pub use device::{
    Completed, ConfigNotifier, Device, DeviceError, HandlerError, Outcome, QueueHandler,
};
pub use poll::AdaptivePoll;
pub use service::{Event, QueueService, ServiceError};

// The crates a device author needs with the core's types, in the versions the core uses.
pub use virtio_bindings;
pub use vm_memory;

/// The driver's memory as every transport maps it (vhost-user regions, the VDUSE IOTLB).
pub type GuestMem = vm_memory::GuestMemoryMmap<()>;

/// `VIRTIO_F_VERSION_1`: every device served by virtiod is a virtio 1.x device.
pub const F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// `VIRTIO_RING_F_EVENT_IDX`: notification suppression by index, handled by [`QueueService`].
pub const F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
/// `VIRTIO_RING_F_INDIRECT_DESC`: indirect descriptor tables, handled by [`Chain`].
pub const F_INDIRECT_DESC: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
/// `VIRTIO_F_ACCESS_PLATFORM`: driver addresses are IOVAs (VDUSE requires it).
pub const F_ACCESS_PLATFORM: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_ACCESS_PLATFORM;
/// `VIRTIO_CONFIG_S_DRIVER_OK`.
pub const STATUS_DRIVER_OK: u8 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER_OK as u8;
