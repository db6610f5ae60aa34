//! One queue of a qcow2 image: allocated clusters on `io_uring`, the rest through `imago`.

use std::os::fd::RawFd;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use imago::ShallowMapping;

use super::{flush_image, Image};
use crate::file::FileQueue;
use crate::{BackendQueue, Completion, IoRequest, Op, Result};

/// The per-queue context: the ring on the image file and the shared image metadata.
pub(super) struct Qcow2Queue {
    io: FileQueue,
    image: Arc<Image>,
    flush_failed: Arc<AtomicBool>,
    /// Reused buffer for requests served through `imago` (no allocation once grown).
    bounce: Vec<u8>,
}

/// An `imago` error as an errno, logged (the driver only sees the status byte).
fn errno(what: &str, offset: u64, e: std::io::Error) -> i32 {
    tracing::warn!(op = what, offset, %e, "qcow2 request failed");
    e.raw_os_error().unwrap_or(libc::EIO)
}

impl Qcow2Queue {
    pub(super) fn new(io: FileQueue, image: Arc<Image>, flush_failed: Arc<AtomicBool>) -> Self {
        Self {
            io,
            image,
            flush_failed,
            bounce: Vec::new(),
        }
    }

    /// The host offset of `offset..offset+len` when it is one run of clusters of the top image
    /// that the operation can use as it is: readable for a READ, writable in place (allocated,
    /// not shared, not compressed) for a WRITE.
    fn direct_offset(&self, op: Op, offset: u64, len: u64) -> Option<u64> {
        let (mapping, mapped) = self.image.get_shallow_mapping(offset, len).ok()?;
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
                self.image
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
                self.image
                    .write(&self.bounce[..len], offset)
                    .map_err(|e| errno("write", offset, e))?;
                Ok(len as u32)
            }
            Op::Flush => flush_image(&self.image, &self.flush_failed)
                .map(|()| 0)
                .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO)),
            // Clusters are marked as reading zeroes and stay allocated: freeing them while
            // other queues may have writes in flight to them is not safe.
            Op::Discard | Op::WriteZeroes { .. } => self
                .image
                .write_zeroes(offset, req.len)
                .map(|()| 0)
                .map_err(|e| errno("write-zeroes", offset, e)),
        }
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
        self.io.reap(out);
    }

    fn wait(&mut self) -> Result<()> {
        self.io.wait()
    }
}
