//! Storage backends for virtiod.
//!
//! A backend is chosen by an *image spec* ([`open`]):
//! - a path: a raw image file or a block device, served with `io_uring`, `O_DIRECT` by default;
//! - `mem:SIZE`: RAM-backed, for tests;
//! - `null:SIZE`: reads return zeroes, writes are dropped (the benchmark backend).
//!
//! Each device queue gets its own [`BackendQueue`] (for the file backend: its own `io_uring`),
//! so queue threads never share a lock on the hot path. I/O is asynchronous: the engine
//! [submits](BackendQueue::submit) requests tagged with a slot number, then
//! [reaps](BackendQueue::reap) completions, either when [`BackendQueue::completion_fd`] becomes
//! readable or, for backends without one, right after submitting.

mod file;
mod mem;
mod null;
mod spec;

use std::os::fd::RawFd;

pub use file::{FileBackend, FileOptions};
pub use mem::MemBackend;
pub use null::NullBackend;
pub use spec::{open, parse_size, ImageSpec, OpenOptions};

/// Size of a virtio-blk sector in bytes.
pub const SECTOR_SIZE: u64 = 512;

/// Errors of the storage backends.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image spec could not be understood.
    #[error("invalid image spec {spec:?}: {reason}")]
    InvalidSpec {
        /// The spec as given.
        spec: String,
        /// What is wrong with it and what to write instead.
        reason: String,
    },
    /// The image file could not be opened.
    #[error("cannot open image {path}: {cause}{hint}")]
    Open {
        /// Path of the image.
        path: String,
        /// The OS error.
        cause: std::io::Error,
        /// A hint on what to do, may be empty.
        hint: &'static str,
    },
    /// The image size is not usable as a virtio-blk disk.
    #[error("image {path} is {size} bytes, not a multiple of 512: resize it (e.g. truncate -s 64M {path})")]
    BadSize {
        /// Path of the image.
        path: String,
        /// Its size in bytes.
        size: u64,
    },
    /// Setting up the asynchronous I/O engine failed.
    #[error("cannot set up io_uring: {0} (needs Linux >= 5.6 and io_uring not disabled by sysctl kernel.io_uring_disabled)")]
    IoUring(std::io::Error),
    /// An I/O submission failed.
    #[error("I/O submission failed: {0}")]
    Submit(std::io::Error),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// What a backend can do; the device engine derives its features and config space from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendInfo {
    /// Capacity in bytes (a multiple of 512).
    pub capacity: u64,
    /// Whether writes must be refused.
    pub read_only: bool,
    /// Logical block size the backend wants (512 or 4096).
    pub block_size: u32,
    /// Whether DISCARD is implemented.
    pub discard: bool,
    /// Whether WRITE_ZEROES is implemented.
    pub write_zeroes: bool,
}

/// One I/O operation for a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Read `offset..` into the buffers.
    Read,
    /// Write the buffers at `offset`.
    Write,
    /// Make every completed write durable (fdatasync).
    Flush,
    /// Deallocate `offset..offset+len`; reads of it may return anything until rewritten.
    Discard,
    /// Make `offset..offset+len` read as zeroes; `unmap` allows deallocating it.
    WriteZeroes {
        /// The driver allows the range to be deallocated.
        unmap: bool,
    },
}

/// A request handed to [`BackendQueue::submit`].
#[derive(Debug)]
pub struct IoRequest<'a> {
    /// What to do.
    pub op: Op,
    /// Byte offset in the image.
    pub offset: u64,
    /// Length in bytes for Discard/WriteZeroes; for Read/Write it is the sum of `iovecs`.
    pub len: u64,
    /// Buffers for Read/Write, in driver memory.
    pub iovecs: &'a [libc::iovec],
}

/// A completion: the tag given at submission and the result (bytes transferred or an errno).
pub type Completion = (u32, std::result::Result<u32, i32>);

/// The storage behind a device. Shared by all queues.
pub trait Backend: Send + Sync {
    /// Capacity and capabilities.
    fn info(&self) -> BackendInfo;
    /// Create the per-queue I/O context (one per queue thread). `depth` is the most requests
    /// the queue will have in flight at once.
    fn queue(&self, depth: u32) -> Result<Box<dyn BackendQueue>>;
    /// Flush everything to stable storage (used at shutdown).
    fn flush(&self) -> std::io::Result<()>;
}

/// The per-queue I/O context of a backend.
pub trait BackendQueue: Send {
    /// Queue one request, tagged with `tag`; it may only start once [`Self::commit`] is called.
    ///
    /// # Safety
    /// Every `iovec` in `req.iovecs` must point to memory that stays valid, and is not accessed
    /// in a conflicting way by this process, until the completion for `tag` has been returned
    /// by [`Self::reap`]. The `iovecs` slice itself must also stay valid until then.
    unsafe fn submit(&mut self, req: &IoRequest<'_>, tag: u32) -> Result<()>;
    /// Start every request queued since the last call (one system call for a batch).
    fn commit(&mut self) -> Result<()>;
    /// A file descriptor that becomes readable when completions are ready, if any. Backends
    /// without one complete requests synchronously: call [`Self::reap`] after [`Self::commit`].
    fn completion_fd(&self) -> Option<RawFd>;
    /// Clear the readiness of [`Self::completion_fd`]; call it when woken by that fd, before
    /// [`Self::reap`].
    fn ack_completion_event(&mut self) {}
    /// Move ready completions into `out` (without blocking).
    fn reap(&mut self, out: &mut Vec<Completion>);
    /// Block until at least one completion is ready or nothing is in flight.
    fn wait(&mut self) -> Result<()>;
}
