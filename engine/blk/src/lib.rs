//! The virtio-blk device (virtio 1.2, section 5.2) on virtiod's device core.
//!
//! [`BlkDevice`] is a [`virtiod_core::Device`]: any transport serves it. Each queue gets a
//! [`BlkQueue`] (with its own backend I/O context, e.g. one `io_uring`), which
//! [parses](request::parse) each chain the core hands it — every descriptor is hostile
//! input — starts it on the storage backend, and when the backend completes it writes the
//! status byte and reports the used entry back to the core.
//!
//! ```text
//! QueueService ──► BlkQueue::start ──► request::parse ──► BackendQueue::submit
//!                                                            │
//! used ring ◄── QueueService ◄── BlkQueue::reap ◄────────────┘ (backend completion)
//! ```
#![deny(missing_docs)]

mod config;
mod device;
pub mod qos;
mod queue;
pub mod request;
mod stats;

pub use config::{BlkConfig, CONFIG_SPACE_SIZE};
pub use device::{BlkDevice, ResizeError, Resized};
pub use qos::{Qos, QosLimits, Rate};
pub use queue::BlkQueue;
pub use request::{Request, RequestError, RequestType};
pub use stats::{OpKind, QueueStats, Stats, LATENCY_BOUNDS_US};

/// Request completed successfully.
pub const VIRTIO_BLK_S_OK: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK as u8;
/// Request failed.
pub const VIRTIO_BLK_S_IOERR: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8;
/// Request type not supported.
pub const VIRTIO_BLK_S_UNSUPP: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_UNSUPP as u8;
