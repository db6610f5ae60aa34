//! One queue of a qcow2 image: allocated clusters on `io_uring`, the rest through `imago`.
//!
//! A DISCARD (or WRITE_ZEROES with UNMAP) frees clusters only when this is the device's only
//! queue: it first waits for its own requests in the ring, then takes the image exclusively,
//! so no request anywhere holds a host offset that could be freed and reused (a late write
//! there would land in another guest range or in metadata). With several queues the clusters
//! are marked as reading zeroes and stay allocated.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use imago::ShallowMapping;

use super::{flush_image, shared, Image};
use crate::file::FileQueue;
use crate::{BackendQueue, Completion, IoRequest, Op, Result};

/// The per-queue context: the ring on the image file and the shared image metadata.
pub(super) struct Qcow2Queue {
    io: FileQueue,
    image: Arc<RwLock<Image>>,
    /// The backend's count of queues; this one is counted until it is dropped.
    queues: Arc<AtomicUsize>,
    flush_failed: Arc<AtomicBool>,
    /// Reused buffer for requests served through `imago` (no allocation once grown).
    bounce: Vec<u8>,
    /// Completions reaped early (while a DISCARD waited for the ring to drain).
    early: Vec<Completion>,
}

/// An `imago` error as an errno, logged (the driver only sees the status byte).
fn errno(what: &str, offset: u64, e: std::io::Error) -> i32 {
    tracing::warn!(op = what, offset, %e, "qcow2 request failed");
    e.raw_os_error().unwrap_or(libc::EIO)
}

impl Qcow2Queue {
    pub(super) fn new(
        io: FileQueue,
        image: Arc<RwLock<Image>>,
        queues: Arc<AtomicUsize>,
        flush_failed: Arc<AtomicBool>,
    ) -> Self {
        queues.fetch_add(1, Ordering::AcqRel);
        Self {
            io,
            image,
            queues,
            flush_failed,
            bounce: Vec::new(),
            early: Vec::new(),
        }
    }

    /// The host offset of `offset..offset+len` when it is one run of clusters of the top image
    /// that the operation can use as it is: readable for a READ, writable in place (allocated,
    /// not shared, not compressed) for a WRITE.
    fn direct_offset(&self, op: Op, offset: u64, len: u64) -> Option<u64> {
        let image = shared(&self.image);
        let (mapping, mapped) = image.get_shallow_mapping(offset, len).ok()?;
        match mapping {
            ShallowMapping::Raw {
                offset: host,
                writable,
                ..
            } if mapped >= len && (op == Op::Read || writable) => Some(host),
            _ => None,
        }
    }

    /// Run a request through `imago`, in this thread.
    fn execute(&mut self, req: &mut IoRequest) -> std::result::Result<u32, i32> {
        let offset = req.offset;
        match req.op {
            Op::Read => {
                let len = req.buffers.len();
                self.bounce.resize(len, 0);
                shared(&self.image)
                    .read(&mut self.bounce[..len], offset)
                    .map_err(|e| errno("read", offset, e))?;
                req.buffers
                    .copy_from_slice(0, &self.bounce[..len])
                    .map_err(|_| libc::EFAULT)?;
                Ok(len as u32)
            }
            Op::Write => {
                let len = req.buffers.len();
                self.bounce.resize(len, 0);
                req.buffers
                    .copy_to_slice(0, &mut self.bounce[..len])
                    .map_err(|_| libc::EFAULT)?;
                shared(&self.image)
                    .write(&self.bounce[..len], offset)
                    .map_err(|e| errno("write", offset, e))?;
                Ok(len as u32)
            }
            Op::Flush => flush_image(&shared(&self.image), &self.flush_failed)
                .map(|()| 0)
                .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO)),
            Op::Discard | Op::WriteZeroes { unmap: true } => self.discard(offset, req.len),
            Op::WriteZeroes { unmap: false } => shared(&self.image)
                .write_zeroes(offset, req.len)
                .map(|()| 0)
                .map_err(|e| errno("write-zeroes", offset, e)),
        }
    }

    /// Make the range read as zeroes, freeing its clusters when that is safe (see the module
    /// documentation).
    fn discard(&mut self, offset: u64, len: u64) -> std::result::Result<u32, i32> {
        // Our own requests in the ring may target the clusters: let them finish first.
        while self.io.in_flight() > 0 {
            if let Err(e) = self.io.wait() {
                tracing::warn!(%e, "cannot wait for in-flight requests before a discard");
                break;
            }
            self.io.reap(&mut self.early);
        }
        if self.io.in_flight() == 0 {
            let mut image = self.image.write().unwrap_or_else(|e| e.into_inner());
            // Counted while the lock is held: a queue created now cannot look up a mapping
            // before we are done, and one counted earlier may have requests in flight.
            if self.queues.load(Ordering::Acquire) == 1 {
                match image.discard_to_zero(offset, len) {
                    Ok(()) => return Ok(0),
                    // Version 2 images have no zero clusters to discard to.
                    Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {}
                    Err(e) => return Err(errno("discard", offset, e)),
                }
            }
        }
        shared(&self.image)
            .write_zeroes(offset, len)
            .map(|()| 0)
            .map_err(|e| errno("discard", offset, e))
    }
}

impl BackendQueue for Qcow2Queue {
    fn submit(&mut self, mut req: IoRequest, tag: u32) -> Result<()> {
        if matches!(req.op, Op::Read | Op::Write) && !req.buffers.is_empty() {
            let len = req.buffers.len() as u64;
            if let Some(host) = self.direct_offset(req.op, req.offset, len) {
                req.offset = host;
                return self.io.submit(req, tag);
            }
        }
        let result = self.execute(&mut req);
        self.io.complete_now(req, tag, result)
    }

    fn commit(&mut self) -> Result<()> {
        self.io.commit()
    }

    fn completion_fd(&self) -> Option<RawFd> {
        self.io.completion_fd()
    }

    fn ack_completion_event(&mut self) {
        self.io.ack_completion_event();
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.early);
        self.io.reap(out);
    }

    fn wait(&mut self) -> Result<()> {
        if self.early.is_empty() {
            self.io.wait()
        } else {
            Ok(())
        }
    }
}

impl Drop for Qcow2Queue {
    fn drop(&mut self) {
        // Stop being counted only once none of our requests is in the ring any more.
        while self.io.in_flight() > 0 && self.io.wait().is_ok() {
            self.io.reap(&mut self.early);
        }
        self.queues.fetch_sub(1, Ordering::AcqRel);
    }
}
