//! Turns VDUSE's IOVA space into `vm_memory` guest memory.
//!
//! Each IOTLB entry from `VDUSE_IOTLB_GET_FD` is mmapped (through vm-memory's
//! `MmapRegionBuilder`, so this module needs no `unsafe`) and placed at
//! `GuestAddress(entry.start)` in a [`GuestMemoryMmap`]. The virtio engine then reads
//! descriptors and buffers by IOVA, and vm-memory bounds-checks every access: an IOVA
//! outside the mapped entries is an error, never a wild pointer.
//!
//! # Read-only regions
//! A driver may map a buffer read-only (the fd then comes opened `O_RDONLY`), yet a
//! descriptor may still ask the device to write there. A `PROT_READ` mapping would turn
//! that write into SIGSEGV, killing the daemon on a driver bug. So read-only entries are
//! mapped **`PROT_READ|PROT_WRITE` with `MAP_PRIVATE`**: reads see the driver's data, and
//! a stray write lands in a private copy-on-write page of this process and never reaches
//! the driver. (That page then stays private until the entry is invalidated and remapped.)
//! Engines that want to fail such requests explicitly can ask [`IotlbMemory::is_writable`].
//!
//! Write-only entries cannot be mmapped at all (Linux needs read access on the fd); they
//! are skipped, so accesses there fail vm-memory's bounds check. So is an entry that ends
//! at the very top of the 64-bit space (vm-memory regions cannot end at 2^64). VDUSE's own bounce
//! buffer and coherent mappings are always read-write.
//!
//! # Lifetime
//! Snapshots are `Arc`s: after an UPDATE_IOTLB invalidation, requests still in flight
//! keep the old mapping alive until they drop their snapshot. Never touch IOVAs that no
//! descriptor names: unallocated bounce pages fault with SIGBUS in the VDUSE kernel module.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::device::{IotlbEntry, IotlbPerm, VduseDevice};
use crate::error::{Error, Result};

/// Where IOTLB entries and their fds come from: the VDUSE device, or a fake in tests.
pub trait IotlbSource {
    /// The first entry overlapping `start..=last` and an fd to mmap it; `None` if none.
    fn iotlb_get_fd(&self, start: u64, last: u64) -> Result<Option<(IotlbEntry, OwnedFd)>>;
}

impl IotlbSource for VduseDevice {
    fn iotlb_get_fd(&self, start: u64, last: u64) -> Result<Option<(IotlbEntry, OwnedFd)>> {
        VduseDevice::iotlb_get_fd(self, start, last)
    }
}

#[derive(Debug)]
struct MappedRegion {
    entry: IotlbEntry,
    mapping: Arc<MmapRegion<()>>,
}

/// The set of mapped IOTLB entries, kept up to date on demand and on invalidation.
#[derive(Debug, Default)]
pub struct IotlbMemory {
    /// Mapped entries keyed by first IOVA; never overlapping.
    regions: BTreeMap<u64, MappedRegion>,
    /// Cached snapshot; `None` after any change.
    snapshot: Option<Arc<GuestMemoryMmap<()>>>,
}

fn map_entry(entry: &IotlbEntry, fd: OwnedFd) -> Result<Option<Arc<MmapRegion<()>>>> {
    let fail = |reason: String| Error::IotlbMap {
        start: entry.start,
        last: entry.last,
        reason,
    };
    let (prot, flags) = match entry.perm {
        IotlbPerm::ReadWrite => (libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED),
        // See the module docs: writes stay private instead of faulting.
        IotlbPerm::ReadOnly => (libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE),
        IotlbPerm::WriteOnly => return Ok(None),
    };
    // vm-memory cannot place a region whose end is 2^64: mapping it would make every later
    // snapshot fail and with it the whole device. Skip it like a write-only entry; accesses
    // there fail the bounds check (found by fuzz target vduse_message).
    if entry.last == u64::MAX {
        return Ok(None);
    }
    let len = entry
        .len()
        .ok_or_else(|| fail("entry covers the whole 64-bit space".into()))?;
    let len = usize::try_from(len).map_err(|_| fail("entry too large".into()))?;
    if entry.offset & (crate::raw::page_size() - 1) != 0 {
        return Err(fail(format!(
            "mmap offset {:#x} is not page-aligned",
            entry.offset
        )));
    }
    let region = MmapRegionBuilder::new(len)
        .with_file_offset(FileOffset::new(File::from(fd), entry.offset))
        .with_mmap_prot(prot)
        .with_mmap_flags(flags)
        .build()
        .map_err(|e| fail(format!("mmap: {e}")))?;
    Ok(Some(Arc::new(region)))
}

impl IotlbMemory {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps every entry of the IOVA space (walking `0..=u64::MAX` with GET_FD) and
    /// returns the snapshot.
    pub fn map_all(src: &impl IotlbSource) -> Result<Arc<GuestMemoryMmap<()>>> {
        let mut iotlb = IotlbMemory::new();
        iotlb.map_range(src, 0, u64::MAX)?;
        iotlb.memory()
    }

    /// Makes sure every entry overlapping `start..=last` is mapped, asking `src` only for
    /// the gaps. Returns how many entries were newly mapped.
    pub fn map_range(&mut self, src: &impl IotlbSource, start: u64, last: u64) -> Result<usize> {
        let mut added = 0;
        let mut cursor = start;
        while cursor <= last {
            // Skip a mapped region that covers the cursor.
            if let Some(r) = self.region_containing(cursor) {
                match r.entry.last.checked_add(1) {
                    Some(next) if r.entry.last < last => cursor = next,
                    _ => break,
                }
                continue;
            }
            // Ask only about the gap up to the next mapped region.
            let gap_last = match self.regions.range(cursor..).next() {
                Some((&next_start, _)) if next_start <= last => next_start - 1,
                _ => last,
            };
            let Some((entry, fd)) = src.iotlb_get_fd(cursor, gap_last)? else {
                if gap_last == last {
                    break;
                }
                cursor = gap_last + 1;
                continue;
            };
            if entry.last < cursor || entry.start > gap_last || entry.start > entry.last {
                return Err(Error::IotlbMap {
                    start: entry.start,
                    last: entry.last,
                    reason: format!("kernel returned an entry outside {cursor:#x}..={gap_last:#x}"),
                });
            }
            if let Some(mapping) = map_entry(&entry, fd)? {
                self.evict_overlapping(entry.start, entry.last);
                self.regions
                    .insert(entry.start, MappedRegion { entry, mapping });
                self.snapshot = None;
                added += 1;
            }
            match entry.last.checked_add(1) {
                Some(next) if entry.last < last => cursor = next,
                _ => break,
            }
        }
        Ok(added)
    }

    /// Drops every mapped entry overlapping `start..=last` (UPDATE_IOTLB). Returns how
    /// many were dropped; existing snapshots stay valid until dropped.
    pub fn invalidate(&mut self, start: u64, last: u64) -> usize {
        let n = self.evict_overlapping(start, last);
        if n > 0 {
            self.snapshot = None;
        }
        n
    }

    /// Drops every mapping (device reset).
    pub fn clear(&mut self) {
        self.regions.clear();
        self.snapshot = None;
    }

    /// The mapped entries, in IOVA order.
    pub fn entries(&self) -> Vec<IotlbEntry> {
        self.regions.values().map(|r| r.entry).collect()
    }

    /// Whether `addr..addr+len` is mapped without gaps and the driver allows writes there.
    pub fn is_writable(&self, addr: u64, len: u64) -> bool {
        self.check_access(addr, len, true)
    }

    /// Whether `addr..addr+len` is mapped without gaps.
    pub fn is_mapped(&self, addr: u64, len: u64) -> bool {
        self.check_access(addr, len, false)
    }

    /// The current memory snapshot (rebuilt only after a change).
    pub fn memory(&mut self) -> Result<Arc<GuestMemoryMmap<()>>> {
        if let Some(s) = &self.snapshot {
            return Ok(Arc::clone(s));
        }
        let regions = self
            .regions
            .values()
            .map(|r| {
                GuestRegionMmap::with_arc(Arc::clone(&r.mapping), GuestAddress(r.entry.start))
                    .map(Arc::new)
                    .ok_or_else(|| Error::IotlbMap {
                        start: r.entry.start,
                        last: r.entry.last,
                        reason: "region end overflows".into(),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let mem = if regions.is_empty() {
            GuestMemoryMmap::new()
        } else {
            GuestMemoryMmap::from_arc_regions(regions).map_err(|e| Error::IotlbMap {
                start: 0,
                last: u64::MAX,
                reason: e.to_string(),
            })?
        };
        let mem = Arc::new(mem);
        self.snapshot = Some(Arc::clone(&mem));
        Ok(mem)
    }

    fn region_containing(&self, iova: u64) -> Option<&MappedRegion> {
        self.regions
            .range(..=iova)
            .next_back()
            .map(|(_, r)| r)
            .filter(|r| r.entry.contains(iova))
    }

    fn evict_overlapping(&mut self, start: u64, last: u64) -> usize {
        let doomed: Vec<u64> = self
            .regions
            .range(..=last)
            .filter(|(_, r)| r.entry.last >= start)
            .map(|(&k, _)| k)
            .collect();
        for k in &doomed {
            self.regions.remove(k);
        }
        doomed.len()
    }

    fn check_access(&self, addr: u64, len: u64, write: bool) -> bool {
        if len == 0 {
            return true;
        }
        let Some(end) = addr.checked_add(len - 1) else {
            return false;
        };
        let mut cursor = addr;
        loop {
            let Some(r) = self.region_containing(cursor) else {
                return false;
            };
            if write && !r.entry.perm.writable() {
                return false;
            }
            if r.entry.last >= end {
                return true;
            }
            cursor = r.entry.last + 1;
        }
    }
}

#[cfg(test)]
#[path = "iotlb_tests.rs"]
mod tests;
