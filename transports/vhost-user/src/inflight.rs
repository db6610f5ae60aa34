//! The vhost-user in-flight region (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`), split rings.
//!
//! The backend allocates a shared memory file on `GET_INFLIGHT_FD`; the frontend (QEMU) keeps
//! it for the lifetime of the device and hands it to every backend process that connects
//! later with `SET_INFLIGHT_FD`. A backend that was killed therefore leaves behind, in memory
//! it does not own, exactly which requests it had taken off the avail ring and not yet
//! completed, and the next backend executes them again. The layout and the recovery are the
//! core's ([`virtiod_core::inflight`]); this module only maps the file, guarded against a
//! frontend that shrinks it (`fault.rs`).

use std::fs::File;
use std::io;
use std::sync::Arc;

use virtiod_core::inflight::{self as core_inflight, InflightQueue, RecordMemory};
use vm_memory::MmapRegion;
use vmm_sys_util::eventfd::EventFd;

use crate::fault::{sealed_memfd, MapError, SharedFile};

impl RecordMemory for SharedFile {
    fn mmap(&self) -> &MmapRegion<()> {
        self
    }
}

/// The whole region mapped by this process (guarded against the frontend shrinking it).
pub struct InflightRegion {
    file: Arc<SharedFile>,
    blocks: core_inflight::InflightRegion,
    layout: Layout,
}

/// Where the region lies in its file and how it is divided (what `SET_INFLIGHT_FD` says).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Offset of the region in its file.
    pub offset: u64,
    /// Bytes of the region.
    pub size: u64,
    /// Queues it has a block for.
    pub num_queues: u16,
    /// Descriptors per queue.
    pub queue_size: u16,
}

fn map_err(e: MapError) -> io::Error {
    match e {
        MapError::Io(e) => e,
        e => io::Error::new(io::ErrorKind::InvalidInput, e.to_string()),
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl InflightRegion {
    /// A fresh region for `num_queues` queues of `queue_size` descriptors (the answer to
    /// `GET_INFLIGHT_FD`); the returned file is what the frontend keeps.
    pub fn create(num_queues: u16, queue_size: u16) -> io::Result<(Self, File, u64)> {
        if num_queues == 0 || queue_size == 0 {
            return Err(invalid(
                "in-flight region for zero queues or descriptors".into(),
            ));
        }
        let len = core_inflight::InflightRegion::len_for(num_queues, queue_size);
        // Sealed: the frontend keeps this file but cannot shrink it under us.
        let file = sealed_memfd(c"virtiod-inflight", len as u64)?;
        let theirs = file.try_clone()?;
        let mapped = Arc::new(SharedFile::map(file, 0, len as u64, None).map_err(map_err)?);
        let blocks =
            core_inflight::InflightRegion::within(mapped.clone(), 0, num_queues, queue_size)?;
        let layout = Layout {
            offset: 0,
            size: len as u64,
            num_queues,
            queue_size,
        };
        Ok((
            Self {
                file: mapped,
                blocks,
                layout,
            },
            theirs,
            len as u64,
        ))
    }

    /// Map the region a frontend hands over with `SET_INFLIGHT_FD`; if the frontend shrinks
    /// the file later, `wake` is written to.
    pub fn open_watched(
        file: File,
        offset: u64,
        size: u64,
        num_queues: u16,
        queue_size: u16,
        wake: Option<Arc<EventFd>>,
    ) -> io::Result<Self> {
        let need = core_inflight::InflightRegion::len_for(num_queues, queue_size);
        if num_queues == 0 || queue_size == 0 || size < need as u64 {
            return Err(invalid(format!(
                "in-flight region of {size} bytes cannot hold {num_queues} queues of {queue_size}"
            )));
        }
        let mapped = Arc::new(SharedFile::map(file, offset, need as u64, wake).map_err(map_err)?);
        let blocks =
            core_inflight::InflightRegion::within(mapped.clone(), 0, num_queues, queue_size)?;
        let layout = Layout {
            offset,
            size,
            num_queues,
            queue_size,
        };
        Ok(Self {
            file: mapped,
            blocks,
            layout,
        })
    }

    /// The region's file and layout (to hand it to another process).
    pub fn shared(&self) -> (&File, Layout) {
        (self.file.file(), self.layout)
    }

    /// Whether the frontend shrank the file under the region.
    pub fn poisoned(&self) -> bool {
        self.file.poisoned()
    }

    /// The block of queue `index`, if the region has one.
    pub fn queue(&self, index: usize) -> Option<InflightQueue> {
        self.blocks.queue(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, FileOffset, VolatileMemory};

    #[test]
    fn the_frontend_sees_the_blocks_in_the_shared_layout() {
        let (region, file, len) = InflightRegion::create(2, 8).unwrap();
        assert_eq!(len, 2 * core_inflight::queue_block_len(8) as u64);
        let mut q1 = region.queue(1).unwrap();
        q1.initialise(0);
        q1.popped(3);
        let other = MmapRegion::<()>::from_file(FileOffset::new(file, 0), len as usize).unwrap();
        let s = other.as_volatile_slice();
        let base = core_inflight::queue_block_len(8);
        let flag: u8 = s.read_obj(base + 16 + 16 * 3).unwrap();
        assert_eq!(flag, 1);
        assert!(region.queue(2).is_none());
        assert!(!region.poisoned());
    }

    #[test]
    fn a_region_too_small_or_outside_its_file_is_refused() {
        let (_region, file, len) = InflightRegion::create(1, 8).unwrap();
        let dup = file.try_clone().unwrap();
        assert!(InflightRegion::open_watched(file, 0, len, 2, 8, None).is_err());
        assert!(InflightRegion::open_watched(dup, 4096, len, 1, 8, None).is_err());
    }
}
