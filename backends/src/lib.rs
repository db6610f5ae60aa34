//! Storage backends for virtiod.
//!
//! A backend is chosen by an *image spec* ([`open`]):
//! - a path or `raw:PATH`: a raw image file or a block device, served with `io_uring`,
//!   `O_DIRECT` by default;
//! - `qcow2:PATH`: a qcow2 image and its backing chain (formats are never probed: a path
//!   without `qcow2:` is raw, whatever its first bytes);
//! - `mem:SIZE`: RAM-backed, for tests;
//! - `null:SIZE`: reads return zeroes, writes are dropped (the benchmark backend);
//! - `nbd+unix:///EXPORT?socket=PATH`, `nbd://HOST[:PORT]/EXPORT`: an export of an NBD server;
//! - `rbd:POOL/IMAGE[@SNAP][?conf=PATH&id=CLIENT&keyring=PATH]`: a Ceph RBD image (librbd).
//!
//! Each device queue gets its own [`BackendQueue`] (for the file backend: its own `io_uring`),
//! so queue threads never share a lock on the hot path. I/O is asynchronous: the engine
//! [submits](BackendQueue::submit) requests tagged with a slot number, then
//! [reaps](BackendQueue::reap) completions, either when [`BackendQueue::completion_fd`] becomes
//! readable or, for backends without one, right after submitting.
//!
//! # Writing a backend
//!
//! A backend needs no `unsafe`. Each request arrives by value ([`IoRequest`]) with its data
//! buffers ([`IoBuffers`]): they own an `Arc` of the driver memory, were checked by the engine
//! when it built them, and are accessed with bounds-checked volatile copies. The backend keeps
//! the request until it hands its buffers back in a [`Completion`]. Only a backend that gives
//! [`IoBuffers::iovecs`] to the kernel writes `unsafe`, at that system call (see `file.rs`).
//!
//! A RAM disk that completes every request at once:
//!
//! ```
//! use std::os::fd::RawFd;
//! use virtiod_backend::{BackendQueue, Completion, IoRequest, Op, Result};
//!
//! struct TinyQueue {
//!     disk: Vec<u8>,
//!     done: Vec<Completion>,
//! }
//!
//! impl TinyQueue {
//!     fn execute(&mut self, req: &mut IoRequest) -> std::result::Result<u32, i32> {
//!         let start = usize::try_from(req.offset).map_err(|_| libc::EINVAL)?;
//!         let end = start.checked_add(req.buffers.len()).ok_or(libc::EINVAL)?;
//!         let range = self.disk.get_mut(start..end).ok_or(libc::EINVAL)?;
//!         match req.op {
//!             Op::Read => req.buffers.copy_from_slice(0, range),
//!             Op::Write => req.buffers.copy_to_slice(0, range),
//!             _ => return Err(libc::EOPNOTSUPP),
//!         }
//!         .map_err(|_| libc::EFAULT)?;
//!         Ok(req.buffers.len() as u32)
//!     }
//! }
//!
//! impl BackendQueue for TinyQueue {
//!     fn submit(&mut self, mut req: IoRequest, tag: u32) -> Result<()> {
//!         let result = self.execute(&mut req);
//!         self.done.push(Completion::new(tag, result, req)); // hands the buffers back
//!         Ok(())
//!     }
//!     fn commit(&mut self) -> Result<()> {
//!         Ok(())
//!     }
//!     fn completion_fd(&self) -> Option<RawFd> {
//!         None // synchronous: the engine reaps right after committing
//!     }
//!     fn reap(&mut self, out: &mut Vec<Completion>) {
//!         out.append(&mut self.done);
//!     }
//!     fn wait(&mut self) -> Result<()> {
//!         Ok(())
//!     }
//! }
//!
//! // What the engine does with it, with buffers in (test) driver memory.
//! use std::sync::Arc;
//! use virtiod_backend::{Direction, DriverMemory, IoBuffers};
//! use vm_memory::{Bytes, GuestAddress};
//!
//! let mem = Arc::new(DriverMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap());
//! let segments = [(GuestAddress(0x1000), 512), (GuestAddress(0x3000), 512)];
//! let buffers = IoBuffers::from_segments(mem.clone(), segments, Direction::DeviceWrites).unwrap();
//! let mut queue = TinyQueue { disk: vec![7; 4096], done: Vec::new() };
//! queue.submit(IoRequest { op: Op::Read, offset: 0, len: 1024, buffers }, 3).unwrap();
//! let mut out = Vec::new();
//! queue.reap(&mut out);
//! assert_eq!((out[0].tag, out[0].result), (3, Ok(1024)));
//! assert_eq!(mem.read_obj::<u8>(GuestAddress(0x31ff)).unwrap(), 7);
//! ```

#![deny(missing_docs)]

mod buffers;
mod file;
mod mem;
mod nbd;
mod null;
mod qcow2;
mod rbd;
mod spec;

use std::os::fd::RawFd;

pub use buffers::{BufferError, Direction, DriverMemory, IoBuffers, MAX_SEGMENTS};
pub use file::{FileBackend, FileOptions};
pub use mem::MemBackend;
pub use nbd::{fuzz as nbd_fuzz, NbdAddress, NbdBackend, NbdError, NbdOptions, NbdTarget};
pub use null::NullBackend;
pub use qcow2::{
    looks_like_qcow2, parse_header as parse_qcow2_header, read_header as read_qcow2_header,
    Backing as Qcow2Backing, BackingFormat, Header as Qcow2Header, Qcow2Backend, Qcow2Options,
};
pub use rbd::{admin as rbd_admin, RbdAddress, RbdBackend, RbdError};
pub use spec::{detect_format, open, parse_size, ImageSpec, OpenOptions};

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
    /// A qcow2 image (or an image of its backing chain) cannot be served.
    #[error("qcow2 image {path}: {reason}")]
    Qcow2 {
        /// Path of the image.
        path: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// An NBD export could not be opened.
    #[error(transparent)]
    Nbd(#[from] NbdError),
    /// The image cannot take the size asked for ([`Backend::resize`]).
    #[error("cannot resize: {0}")]
    Resize(String),
    /// An RBD image could not be opened.
    #[error(transparent)]
    Rbd(#[from] RbdError),
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

/// A request handed to [`BackendQueue::submit`], by value: the backend owns it, and with it
/// the request's data buffers, until it returns the [`Completion`].
#[derive(Debug)]
pub struct IoRequest {
    /// What to do.
    pub op: Op,
    /// Byte offset in the image.
    pub offset: u64,
    /// Length in bytes for Discard/WriteZeroes; for Read/Write it is `buffers.len()`.
    pub len: u64,
    /// The data: written into for Read ([`Direction::DeviceWrites`]), read from for Write
    /// ([`Direction::DeviceReads`]); no bytes for the other operations.
    pub buffers: IoBuffers,
}

/// The end of a request: its tag, its result, and its buffers handed back.
///
/// Handing the buffers back lets the engine reuse their vectors for the next request (no
/// allocation per request on the data path) and write the status byte through the same
/// memory snapshot. A backend may instead drop them and return [`IoBuffers::new`]; the
/// engine then allocates again.
#[derive(Debug)]
pub struct Completion {
    /// The tag given to [`BackendQueue::submit`].
    pub tag: u32,
    /// Bytes transferred, or an errno.
    pub result: std::result::Result<u32, i32>,
    /// The request's buffers, released by the backend.
    pub buffers: IoBuffers,
}

impl Completion {
    /// The completion of `req`, submitted with `tag`.
    pub fn new(tag: u32, result: std::result::Result<u32, i32>, req: IoRequest) -> Self {
        Self {
            tag,
            result,
            buffers: req.buffers,
        }
    }
}

/// The storage behind a device. Shared by all queues.
pub trait Backend: Send + Sync {
    /// Capacity and capabilities.
    fn info(&self) -> BackendInfo;
    /// Create the per-queue I/O context (one per queue thread). `depth` is the most requests
    /// the queue will have in flight at once.
    fn queue(&self, depth: u32) -> Result<Box<dyn BackendQueue>>;
    /// Flush everything to stable storage (used at shutdown).
    fn flush(&self) -> std::io::Result<()>;
    /// Change the capacity to `capacity` bytes (a multiple of 512) while serving; after it,
    /// [`Self::info`] reports it. Whether a smaller size is allowed is the caller's decision
    /// (virtio-blk asks for one only when told to shrink). The default refuses: this kind of
    /// image cannot be resized.
    fn resize(&self, capacity: u64) -> Result<()> {
        let _ = capacity;
        Err(Error::Resize(
            "this kind of image cannot be resized while served: stop the device, resize the image, start it again".into(),
        ))
    }
}

/// The per-queue I/O context of a backend.
pub trait BackendQueue: Send {
    /// Queue one request, tagged with `tag`; it may only start once [`Self::commit`] is called.
    ///
    /// The backend keeps `req` (at least its buffers) until it returns the request's
    /// [`Completion`] from [`Self::reap`]; an asynchronous backend may hand
    /// [`IoBuffers::iovecs`] to the kernel meanwhile. On error the request is dropped and no
    /// completion follows.
    fn submit(&mut self, req: IoRequest, tag: u32) -> Result<()>;
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
