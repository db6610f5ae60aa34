//! Device features and the virtio-blk configuration space.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtiod_backend::BackendInfo;

/// Size of the configuration space we expose (up to and including `write_zeroes_may_unmap`
/// and its padding; secure erase is not offered).
pub const CONFIG_SPACE_SIZE: usize = 60;

/// Most buffers one request may carry (`UIO_MAXIOV`, the limit of `preadv`/`pwritev`); the
/// backend's request buffers enforce the same limit on host ranges.
pub const MAX_SEGMENTS: u32 = virtiod_backend::MAX_SEGMENTS as u32;

/// Largest single buffer the driver should use (advertised as `size_max`). Kept so that
/// `size_max * seg_max` fits an `i32`, which some drivers (libblkio) compute.
pub const SIZE_MAX: u32 = 1 << 20;

/// Largest DISCARD / WRITE_ZEROES range in sectors (advertised limit).
pub const MAX_DISCARD_SECTORS: u32 = u32::MAX >> 9;

/// Everything about one virtio-blk device that the driver can see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Refuse writes and offer `VIRTIO_BLK_F_RO`.
    pub read_only: bool,
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Number of request queues.
    pub num_queues: u16,
    /// Size of each queue.
    pub queue_size: u16,
    /// The device serial returned by GET_ID (at most 20 bytes are used).
    pub serial: Vec<u8>,
    /// Offer DISCARD.
    pub discard: bool,
    /// Offer WRITE_ZEROES.
    pub write_zeroes: bool,
}

impl BlkConfig {
    /// The configuration of a device over `info` with the given queue layout.
    pub fn new(info: &BackendInfo, num_queues: u16, queue_size: u16, serial: &str) -> Self {
        Self {
            capacity_sectors: info.capacity / 512,
            read_only: info.read_only,
            block_size: info.block_size,
            num_queues,
            queue_size,
            serial: serial.as_bytes().iter().copied().take(20).collect(),
            discard: info.discard && !info.read_only,
            write_zeroes: info.write_zeroes && !info.read_only,
        }
    }

    /// Most data segments per request (`seg_max`): the queue must also hold the header and
    /// status descriptors.
    pub fn seg_max(&self) -> u32 {
        u32::from(self.queue_size)
            .saturating_sub(2)
            .clamp(1, MAX_SEGMENTS)
    }

    /// The device feature bits offered to the driver.
    pub fn features(&self) -> u64 {
        let mut bits = [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_MQ,
        ]
        .iter()
        .fold(0u64, |acc, bit| acc | (1u64 << bit));
        if self.read_only {
            bits |= 1 << VIRTIO_BLK_F_RO;
        }
        if self.discard {
            bits |= 1 << VIRTIO_BLK_F_DISCARD;
        }
        if self.write_zeroes {
            bits |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        bits
    }

    /// The configuration space (`struct virtio_blk_config`, little endian).
    pub fn config_space(&self) -> [u8; CONFIG_SPACE_SIZE] {
        let mut c = [0u8; CONFIG_SPACE_SIZE];
        let mut put =
            |offset: usize, bytes: &[u8]| c[offset..offset + bytes.len()].copy_from_slice(bytes);
        put(0, &self.capacity_sectors.to_le_bytes());
        put(8, &SIZE_MAX.to_le_bytes());
        put(12, &self.seg_max().to_le_bytes());
        // 16..20: geometry, not offered.
        put(20, &self.block_size.to_le_bytes());
        // 24..32: topology, not offered. 32: writeback, 33: unused.
        put(34, &self.num_queues.to_le_bytes());
        let align = (self.block_size / 512).max(1);
        if self.discard {
            put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
            put(40, &1u32.to_le_bytes()); // max_discard_seg
            put(44, &align.to_le_bytes());
        }
        if self.write_zeroes {
            put(48, &MAX_DISCARD_SECTORS.to_le_bytes());
            put(52, &1u32.to_le_bytes()); // max_write_zeroes_seg
            put(56, &[1]); // write_zeroes_may_unmap
        }
        c
    }

    /// Read `len` bytes of the configuration space at `offset` (out-of-range bytes read as 0).
    pub fn read_config(&self, offset: u32, len: u32) -> Vec<u8> {
        let space = self.config_space();
        (offset..offset.saturating_add(len))
            .map(|i| space.get(i as usize).copied().unwrap_or(0))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(read_only: bool) -> BlkConfig {
        let info = BackendInfo {
            capacity: 64 << 20,
            read_only,
            block_size: 512,
            discard: true,
            write_zeroes: true,
        };
        BlkConfig::new(&info, 2, 256, "serial-0123456789-abcdef")
    }

    #[test]
    fn features_follow_capabilities() {
        let rw = cfg(false).features();
        assert_ne!(rw & (1 << VIRTIO_F_VERSION_1), 0);
        assert_ne!(rw & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(rw & (1 << VIRTIO_BLK_F_RO), 0);
        let ro = cfg(true).features();
        assert_ne!(ro & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(
            ro & (1 << VIRTIO_BLK_F_DISCARD),
            0,
            "no discard on a read-only disk"
        );
        assert_eq!(ro & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    }

    #[test]
    fn config_space_layout() {
        let c = cfg(false);
        let s = c.config_space();
        assert_eq!(
            u64::from_le_bytes(s[0..8].try_into().unwrap()),
            (64 << 20) / 512
        );
        assert_eq!(u32::from_le_bytes(s[12..16].try_into().unwrap()), 254);
        assert_eq!(u32::from_le_bytes(s[20..24].try_into().unwrap()), 512);
        assert_eq!(u16::from_le_bytes(s[34..36].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(s[40..44].try_into().unwrap()), 1);
        assert_eq!(s[56], 1);
        assert_eq!(c.serial.len(), 20, "serial is cut to 20 bytes");
        assert_eq!(c.read_config(34, 2), vec![2, 0]);
        assert_eq!(
            c.read_config(58, 4),
            vec![0, 0, 0, 0],
            "past the end reads as zero"
        );
    }
}
