//! The in-flight log: a small MAP_SHARED file per device that survives the process, so that a
//! daemon restarted after SIGKILL or a crash completes every request the driver is waiting
//! for. The kernel keeps no such state for VDUSE (reconnect support was never merged).
//!
//! Layout (little endian): a 64-byte header (magic, version, queue count and size, the last
//! device status the driver set, the offered features and the capacity), then per queue a
//! block of `last_avail: u16`, `used_idx: u16`, 4 reserved bytes and one in-flight flag byte
//! per descriptor head.
//!
//! Write order (each store is atomic, Release):
//! - pop: `inflight[head] = 1`, then `last_avail`;
//! - complete: the used entry and the ring's used index (by the queue), then
//!   `inflight[head] = 0`, then `used_idx`.
//!
//! Recovery repairs the two windows a kill can leave: used entries published after the log's
//! `used_idx` are completed (their flags are cleared), and heads flagged in flight that are
//! still at or after `last_avail` on the avail ring were never taken (their flags are
//! cleared; they are popped again).

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtiod_blk::InflightTracker;
use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory};

const MAGIC: &[u8; 8] = b"VIRTIODL";
const VERSION: u32 = 1;
const HEADER: usize = 64;
const OFF_STATUS: usize = 16;

/// Identity of the device a log belongs to; a log is only reused for the same device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Identity {
    pub num_queues: u16,
    pub queue_size: u16,
    pub features: u64,
    pub capacity_sectors: u64,
}

/// The mapped log file of one device.
pub(crate) struct StateLog {
    region: Arc<MmapRegion<()>>,
    path: PathBuf,
    id: Identity,
}

fn block_len(queue_size: u16) -> usize {
    (8 + usize::from(queue_size)).div_ceil(64) * 64
}

fn file_len(id: &Identity) -> usize {
    HEADER + usize::from(id.num_queues) * block_len(id.queue_size)
}

/// Path of the log of device `name` in `dir`.
pub(crate) fn log_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("vduse-{name}.log"))
}

fn map(path: &Path, len: usize, create: bool) -> io::Result<MmapRegion<()>> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(create)
        .mode(0o600)
        .open(path)?;
    if create {
        file.set_len(len as u64)?;
    } else if file.metadata()?.len() != len as u64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "log has the wrong size",
        ));
    }
    MmapRegion::from_file(FileOffset::new(file, 0), len).map_err(io::Error::other)
}

impl StateLog {
    /// Create a fresh (zeroed) log for a new device.
    pub fn create(dir: &Path, name: &str, id: Identity) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = log_path(dir, name);
        let region = map(&path, file_len(&id), true)?;
        let log = Self {
            region: Arc::new(region),
            path,
            id,
        };
        let s = log.region.as_volatile_slice();
        s.write_slice(MAGIC, 0).map_err(io::Error::other)?;
        s.write_obj(VERSION.to_le(), 8).map_err(io::Error::other)?;
        s.write_obj(id.num_queues.to_le(), 12)
            .map_err(io::Error::other)?;
        s.write_obj(id.queue_size.to_le(), 14)
            .map_err(io::Error::other)?;
        s.write_obj(id.features.to_le(), 24)
            .map_err(io::Error::other)?;
        s.write_obj(id.capacity_sectors.to_le(), 32)
            .map_err(io::Error::other)?;
        Ok(log)
    }

    /// Open the log a previous process left for this device; `Ok(None)` if there is none.
    pub fn open_existing(dir: &Path, name: &str, id: Identity) -> io::Result<Option<Self>> {
        let path = log_path(dir, name);
        if !path.exists() {
            return Ok(None);
        }
        let region = map(&path, file_len(&id), false)?;
        let s = region.as_volatile_slice();
        let mut magic = [0u8; 8];
        s.read_slice(&mut magic, 0).map_err(io::Error::other)?;
        let version: u32 = s.read_obj(8).map_err(io::Error::other)?;
        let found = Identity {
            num_queues: u16::from_le(s.read_obj(12).map_err(io::Error::other)?),
            queue_size: u16::from_le(s.read_obj(14).map_err(io::Error::other)?),
            features: u64::from_le(s.read_obj(24).map_err(io::Error::other)?),
            capacity_sectors: u64::from_le(s.read_obj(32).map_err(io::Error::other)?),
        };
        if &magic != MAGIC || u32::from_le(version) != VERSION || found != id {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("it belongs to a device with other settings ({found:?}); restart with the same options"),
            ));
        }
        Ok(Some(Self {
            region: Arc::new(region),
            path,
            id,
        }))
    }

    /// The last device status the driver set.
    pub fn status(&self) -> u8 {
        self.region
            .as_volatile_slice()
            .load(OFF_STATUS, Ordering::Acquire)
            .unwrap_or(0)
    }

    /// Record a status the driver set.
    pub fn set_status(&self, status: u8) {
        let _ = self
            .region
            .as_volatile_slice()
            .store(status, OFF_STATUS, Ordering::Release);
    }

    /// The log of queue `index`.
    pub fn queue(&self, index: usize) -> QueueLog {
        QueueLog {
            region: self.region.clone(),
            base: HEADER + index * block_len(self.id.queue_size),
            size: self.id.queue_size,
        }
    }

    /// Remove the file (clean shutdown: nothing to recover).
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One queue's part of the log; it is the worker's [`InflightTracker`].
pub(crate) struct QueueLog {
    region: Arc<MmapRegion<()>>,
    base: usize,
    size: u16,
}

impl QueueLog {
    fn store_u8(&self, off: usize, v: u8) {
        let _ = self
            .region
            .as_volatile_slice()
            .store(v, self.base + off, Ordering::Release);
    }
    fn store_u16(&self, off: usize, v: u16) {
        let _ = self
            .region
            .as_volatile_slice()
            .store(v, self.base + off, Ordering::Release);
    }
    fn load_u8(&self, off: usize) -> u8 {
        self.region
            .as_volatile_slice()
            .load(self.base + off, Ordering::Acquire)
            .unwrap_or(0)
    }
    fn load_u16(&self, off: usize) -> u16 {
        self.region
            .as_volatile_slice()
            .load(self.base + off, Ordering::Acquire)
            .unwrap_or(0)
    }

    /// Where the previous process stopped taking requests off the avail ring.
    pub fn last_avail(&self) -> u16 {
        self.load_u16(0)
    }

    /// Start a queue afresh (DRIVER_OK after a reset): nothing in flight.
    pub fn reset(&self, last_avail: u16, used_idx: u16) {
        for head in 0..self.size {
            self.store_u8(8 + usize::from(head), 0);
        }
        self.store_u16(0, last_avail);
        self.store_u16(2, used_idx);
    }

    /// After a restart: repair the log against the rings and return the heads that were in
    /// flight. `ring_used_idx` is the used index in the ring; `used_id(i)` the head in used
    /// slot `i`; `avail_idx` the driver's avail index and `avail_head(i)` its entry `i`.
    pub fn recover(
        &self,
        ring_used_idx: u16,
        used_id: impl Fn(u16) -> Option<u16>,
        avail_idx: u16,
        avail_head: impl Fn(u16) -> Option<u16>,
    ) -> Vec<u16> {
        // Published used entries the log did not record yet: those requests are complete.
        let mut i = self.load_u16(2);
        while i != ring_used_idx {
            if let Some(head) = used_id(i).filter(|h| *h < self.size) {
                self.store_u8(8 + usize::from(head), 0);
            }
            i = i.wrapping_add(1);
        }
        self.store_u16(2, ring_used_idx);
        // Heads flagged but still on the ring past last_avail were never really taken.
        let mut i = self.last_avail();
        let mut guard = 0u32;
        while i != avail_idx && guard < u32::from(self.size) {
            if let Some(head) = avail_head(i).filter(|h| *h < self.size) {
                self.store_u8(8 + usize::from(head), 0);
            }
            i = i.wrapping_add(1);
            guard += 1;
        }
        (0..self.size)
            .filter(|h| self.load_u8(8 + usize::from(*h)) != 0)
            .collect()
    }
}

impl InflightTracker for QueueLog {
    fn popped(&mut self, head: u16, next_avail: u16) {
        if head < self.size {
            self.store_u8(8 + usize::from(head), 1);
        }
        self.store_u16(0, next_avail);
    }

    fn used(&mut self, head: u16, next_used: u16) {
        if head < self.size {
            self.store_u8(8 + usize::from(head), 0);
        }
        self.store_u16(2, next_used);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> Identity {
        Identity {
            num_queues: 2,
            queue_size: 8,
            features: 0x1234,
            capacity_sectors: 2048,
        }
    }

    #[test]
    fn survives_reopen_and_refuses_other_devices() {
        let dir = std::env::temp_dir().join(format!("virtiod-state-{}", std::process::id()));
        let log = StateLog::create(&dir, "vd0", id()).unwrap();
        log.set_status(0xf);
        let mut q1 = log.queue(1);
        q1.popped(3, 1);
        q1.popped(5, 2);
        q1.used(3, 1);
        drop(q1);
        drop(log);
        let again = StateLog::open_existing(&dir, "vd0", id()).unwrap().unwrap();
        assert_eq!(again.status(), 0xf);
        let q1 = again.queue(1);
        assert_eq!(q1.last_avail(), 2);
        // Ring: used idx 1 (head 3), avail idx 2 with entries [3, 5].
        let heads = q1.recover(1, |_| Some(3), 2, |i| Some([3, 5][usize::from(i % 2)]));
        assert_eq!(heads, vec![5]);
        assert!(again.queue(0).recover(0, |_| None, 0, |_| None).is_empty());
        let other = Identity {
            capacity_sectors: 4096,
            ..id()
        };
        assert!(StateLog::open_existing(&dir, "vd0", other).is_err());
        assert!(StateLog::open_existing(&dir, "vd9", id())
            .unwrap()
            .is_none());
        again.remove();
        assert!(!log_path(&dir, "vd0").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn recovery_repairs_both_kill_windows() {
        let dir = std::env::temp_dir().join(format!("virtiod-state2-{}", std::process::id()));
        let log = StateLog::create(&dir, "vd1", id()).unwrap();
        let mut q = log.queue(0);
        // Heads 1, 2, 4 popped (last_avail 3); 2 completed and published in the ring, but the
        // process died before logging it (log used_idx still 0).
        q.popped(1, 1);
        q.popped(2, 2);
        q.popped(4, 3);
        // Killed after flagging head 6 but before recording last_avail = 4.
        q.store_u8(8 + 6, 1);
        let avail = [1u16, 2, 4, 6];
        let heads = q.recover(1, |_| Some(2), 4, |i| avail.get(usize::from(i)).copied());
        assert_eq!(heads, vec![1, 4], "2 was completed, 6 was never taken");
        assert_eq!(q.load_u16(2), 1, "used index repaired");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
