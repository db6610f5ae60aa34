//! The in-flight log: a small MAP_SHARED file per device that survives the process, so that a
//! daemon restarted after SIGKILL or a crash completes every request the driver is waiting
//! for. The kernel keeps no such state for VDUSE (reconnect support was never merged).
//!
//! Layout (little endian): a 64-byte header (magic, version, the device's identity, the last
//! device status the driver set), then the core's in-flight blocks, one per queue
//! ([`virtiod_core::inflight`], the same layout vhost-user's in-flight region uses): a request
//! is flagged before it executes and cleared after its used entry is published, and recovery
//! repairs what a kill between the two left behind.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtiod_core::inflight::{InflightQueue, InflightRegion};
use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory};

const MAGIC: &[u8; 8] = b"VIRTIODL";
/// 2: the core's in-flight blocks (1 had a layout of its own).
const VERSION: u32 = 2;
const HEADER: usize = 64;
const OFF_VERSION: usize = 8;
const OFF_NUM_QUEUES: usize = 12;
const OFF_QUEUE_SIZE: usize = 14;
const OFF_STATUS: usize = 16;
const OFF_DEVICE_TYPE: usize = 20;
const OFF_FEATURES: usize = 24;
const OFF_CONFIG_HASH: usize = 32;

/// Identity of the device a log belongs to; a log is only reused for the same device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Identity {
    pub device_type: u32,
    pub num_queues: u16,
    pub queue_size: u16,
    pub features: u64,
    /// FNV-1a of the configuration space (a disk of another size is another device).
    pub config_hash: u64,
}

/// FNV-1a, 64 bits: a stable fingerprint of the configuration space.
pub(crate) fn config_hash(config: &[u8]) -> u64 {
    config.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The mapped log file of one device.
pub(crate) struct StateLog {
    region: Arc<MmapRegion<()>>,
    blocks: InflightRegion,
    path: PathBuf,
}

fn file_len(id: &Identity) -> usize {
    HEADER + InflightRegion::len_for(id.num_queues, id.queue_size)
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

fn read_identity(region: &MmapRegion<()>) -> io::Result<([u8; 8], u32, Identity)> {
    let s = region.as_volatile_slice();
    let mut magic = [0u8; 8];
    s.read_slice(&mut magic, 0).map_err(io::Error::other)?;
    let version: u32 = s.read_obj(OFF_VERSION).map_err(io::Error::other)?;
    let id = Identity {
        device_type: u32::from_le(s.read_obj(OFF_DEVICE_TYPE).map_err(io::Error::other)?),
        num_queues: u16::from_le(s.read_obj(OFF_NUM_QUEUES).map_err(io::Error::other)?),
        queue_size: u16::from_le(s.read_obj(OFF_QUEUE_SIZE).map_err(io::Error::other)?),
        features: u64::from_le(s.read_obj(OFF_FEATURES).map_err(io::Error::other)?),
        config_hash: u64::from_le(s.read_obj(OFF_CONFIG_HASH).map_err(io::Error::other)?),
    };
    Ok((magic, u32::from_le(version), id))
}

fn write_identity(region: &MmapRegion<()>, id: &Identity) -> io::Result<()> {
    let s = region.as_volatile_slice();
    s.write_slice(MAGIC, 0).map_err(io::Error::other)?;
    s.write_obj(VERSION.to_le(), OFF_VERSION)
        .map_err(io::Error::other)?;
    s.write_obj(id.device_type.to_le(), OFF_DEVICE_TYPE)
        .map_err(io::Error::other)?;
    s.write_obj(id.num_queues.to_le(), OFF_NUM_QUEUES)
        .map_err(io::Error::other)?;
    s.write_obj(id.queue_size.to_le(), OFF_QUEUE_SIZE)
        .map_err(io::Error::other)?;
    s.write_obj(id.features.to_le(), OFF_FEATURES)
        .map_err(io::Error::other)?;
    s.write_obj(id.config_hash.to_le(), OFF_CONFIG_HASH)
        .map_err(io::Error::other)
}

impl StateLog {
    fn with_blocks(region: MmapRegion<()>, path: PathBuf, id: &Identity) -> io::Result<Self> {
        let region = Arc::new(region);
        let blocks = InflightRegion::within(region.clone(), HEADER, id.num_queues, id.queue_size)?;
        Ok(Self {
            region,
            blocks,
            path,
        })
    }

    /// Create a fresh (zeroed) log for a new device.
    pub fn create(dir: &Path, name: &str, id: Identity) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = log_path(dir, name);
        let region = map(&path, file_len(&id), true)?;
        write_identity(&region, &id)?;
        Self::with_blocks(region, path, &id)
    }

    /// Open the log a previous process left for this device; `Ok(None)` if there is none.
    pub fn open_existing(dir: &Path, name: &str, id: Identity) -> io::Result<Option<Self>> {
        let path = log_path(dir, name);
        if !path.exists() {
            return Ok(None);
        }
        let region = map(&path, file_len(&id), false)?;
        let (magic, version, found) = read_identity(&region)?;
        if &magic != MAGIC || version != VERSION || found != id {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("it belongs to a device with other settings or another virtiod version ({found:?}, format {version}); restart with the same options"),
            ));
        }
        Self::with_blocks(region, path, &id).map(Some)
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

    /// The config space changed (an online resize): a restarted process, which opens the
    /// image at its new size, must find the same identity.
    pub fn set_config_hash(&self, hash: u64) {
        let _ = self
            .region
            .as_volatile_slice()
            .write_obj(hash.to_le(), OFF_CONFIG_HASH);
    }

    /// The in-flight block of queue `index`.
    pub fn queue(&self, index: usize) -> Option<InflightQueue> {
        self.blocks.queue(index)
    }

    /// Remove the file (clean shutdown: nothing to recover).
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> Identity {
        Identity {
            device_type: 2,
            num_queues: 2,
            queue_size: 8,
            features: 0x1234,
            config_hash: config_hash(&[1, 2, 3]),
        }
    }

    #[test]
    fn survives_reopen_and_refuses_other_devices() {
        let dir = std::env::temp_dir().join(format!("virtiod-state-{}", std::process::id()));
        let log = StateLog::create(&dir, "vd0", id()).unwrap();
        log.set_status(0xf);
        let mut q1 = log.queue(1).unwrap();
        q1.initialise(0);
        q1.popped(3);
        q1.popped(5);
        drop(q1);
        drop(log);
        let again = StateLog::open_existing(&dir, "vd0", id()).unwrap().unwrap();
        assert_eq!(again.status(), 0xf);
        assert_eq!(again.queue(1).unwrap().in_flight(), vec![3, 5]);
        assert!(again.queue(0).unwrap().in_flight().is_empty());
        assert!(again.queue(2).is_none());
        let other = Identity {
            config_hash: config_hash(&[1, 2, 4]),
            ..id()
        };
        assert!(StateLog::open_existing(&dir, "vd0", other).is_err());
        // After an online resize the log names the new config space.
        again.set_config_hash(other.config_hash);
        drop(again);
        let again = StateLog::open_existing(&dir, "vd0", other)
            .unwrap()
            .unwrap();
        assert!(StateLog::open_existing(&dir, "vd0", id()).is_err());
        assert!(StateLog::open_existing(&dir, "vd9", id())
            .unwrap()
            .is_none());
        again.remove();
        assert!(!log_path(&dir, "vd0").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
