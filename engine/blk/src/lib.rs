//! The virtio-blk device engine (virtio 1.2, section 5.2).
//!
//! The engine is transport-agnostic: a transport (vhost-user, VDUSE) owns the virtqueues and
//! the driver's memory and hands them to a [`QueueWorker`], one per queue thread. The worker
//! takes requests off the avail ring, [parses](request::parse) them — every descriptor is
//! hostile input — starts them on the storage backend, and when the backend completes them
//! writes the status byte, fills the used ring and tells the transport whether the driver
//! wants an interrupt.
//!
//! ```text
//! kick ──► QueueWorker::process_queue ──► request::parse ──► BackendQueue::submit
//!                                                               │
//! interrupt ◄── used ring ◄── QueueWorker::process_completions ◄┘ (backend completion)
//! ```

pub mod chain;
mod config;
pub mod request;
mod stats;
mod tracker;
mod worker;

pub use config::{BlkConfig, CONFIG_SPACE_SIZE};
pub use request::{Request, RequestError, RequestType};
pub use stats::{OpKind, QueueStats, Stats, LATENCY_BOUNDS_US};
pub use tracker::InflightTracker;
pub use worker::{Poll, QueueWorker, WorkerError};

/// Request completed successfully.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Request failed.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Request type not supported.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
