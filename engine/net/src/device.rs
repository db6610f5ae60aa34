//! The virtio-net device: what the driver sees (features, configuration space, one queue
//! pair), and the handlers of its two queues.

use std::mem::offset_of;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{virtio_net_config, VIRTIO_NET_S_LINK_UP};
use virtiod_core::{Device, DeviceError, QueueHandler, F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1};

use crate::{
    Mac, NetBackend, NetError, RxQueue, TxQueue, ETH_HLEN, F_MAC, F_MRG_RXBUF, F_MTU, F_STATUS,
    VLAN_HLEN,
};

/// Feature bits offered (no control queue: VDUSE refuses it, and there is one queue pair),
/// with the checksum and TCP segmentation offloads both ways
/// ([`crate::offload::OFFLOAD_FEATURES`]).
pub const FEATURES: u64 = F_VERSION_1
    | F_EVENT_IDX
    | F_INDIRECT_DESC
    | F_MAC
    | F_STATUS
    | F_MTU
    | F_MRG_RXBUF
    | crate::offload::OFFLOAD_FEATURES;
/// MTU when none is given.
pub const DEFAULT_MTU: u16 = 1500;
/// Largest queue size the driver may choose, when none is given.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Smallest MTU (IPv4's minimum datagram).
const MIN_MTU: u16 = 68;
/// Queue index of the receive queue.
const RX_QUEUE: u16 = 0;
/// Queue index of the transmit queue.
const TX_QUEUE: u16 = 1;

/// What a virtio-net device is configured with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig {
    /// The device's MAC address.
    pub mac: Mac,
    /// Largest payload of a frame (without Ethernet header).
    pub mtu: u16,
    /// Largest queue size the driver may choose (a power of two).
    pub queue_size: u16,
}

impl NetConfig {
    /// A device with `mac`, [`DEFAULT_MTU`] and [`DEFAULT_QUEUE_SIZE`].
    pub fn new(mac: Mac) -> Self {
        Self {
            mac,
            mtu: DEFAULT_MTU,
            queue_size: DEFAULT_QUEUE_SIZE,
        }
    }

    /// Largest frame the driver may send or receive: MTU + Ethernet header + a VLAN tag.
    pub fn max_frame(&self) -> usize {
        usize::from(self.mtu) + ETH_HLEN + VLAN_HLEN
    }
}

/// A virtio-net device with one queue pair, whose frames go to one [`NetBackend`].
pub struct NetDevice {
    config: NetConfig,
    backend: Arc<dyn NetBackend>,
    link_up: AtomicBool,
}

impl NetDevice {
    /// A device configured by `config` whose frames go to `backend`; the link is up.
    pub fn new(config: NetConfig, backend: Arc<dyn NetBackend>) -> Result<Self, NetError> {
        if config.mtu < MIN_MTU {
            return Err(NetError::Mtu(config.mtu));
        }
        Ok(Self {
            config,
            backend,
            link_up: AtomicBool::new(true),
        })
    }

    /// The device's backend (its port).
    pub fn backend(&self) -> &Arc<dyn NetBackend> {
        &self.backend
    }

    /// Set the link status the driver reads (no configuration interrupt is sent yet).
    pub fn set_link_up(&self, up: bool) {
        self.link_up.store(up, Ordering::Relaxed);
    }
}

impl Device for NetDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn features(&self) -> u64 {
        FEATURES
    }

    /// `struct virtio_net_config`, little endian: mac, status, max_virtqueue_pairs = 1,
    /// mtu; speed and duplex unknown; no RSS.
    fn config_space(&self) -> Vec<u8> {
        let mut space = vec![0u8; std::mem::size_of::<virtio_net_config>()];
        let mut put = |at: usize, bytes: &[u8]| space[at..at + bytes.len()].copy_from_slice(bytes);
        put(offset_of!(virtio_net_config, mac), &self.config.mac);
        let status = if self.link_up.load(Ordering::Relaxed) {
            VIRTIO_NET_S_LINK_UP as u16
        } else {
            0
        };
        put(offset_of!(virtio_net_config, status), &status.to_le_bytes());
        put(
            offset_of!(virtio_net_config, max_virtqueue_pairs),
            &1u16.to_le_bytes(),
        );
        put(
            offset_of!(virtio_net_config, mtu),
            &self.config.mtu.to_le_bytes(),
        );
        put(
            offset_of!(virtio_net_config, speed),
            &u32::MAX.to_le_bytes(),
        );
        put(offset_of!(virtio_net_config, duplex), &[0xff]);
        space
    }

    fn num_queues(&self) -> u16 {
        2
    }

    fn max_queue_size(&self) -> u16 {
        self.config.queue_size
    }

    fn queue_handler(&self, index: u16) -> Result<Box<dyn QueueHandler>, DeviceError> {
        let max_frame = self.config.max_frame();
        match index {
            RX_QUEUE => Ok(Box::new(RxQueue::new(
                self.backend.clone(),
                // Mergeable until the driver's accepted features say otherwise
                // (`QueueHandler::driver_features`).
                true,
                usize::from(self.config.queue_size),
            ))),
            TX_QUEUE => Ok(Box::new(TxQueue::new(self.backend.clone(), max_frame))),
            _ => Err(DeviceError::Queue {
                queue: index,
                reason: "virtio-net here has one queue pair (0 rx, 1 tx) and no control queue"
                    .into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Switch;

    #[test]
    fn config_space_has_the_layout_of_virtio_net_config() {
        let port = Switch::new("dev").port().unwrap();
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let cfg = NetConfig {
            mtu: 9000,
            ..NetConfig::new(mac)
        };
        let dev = NetDevice::new(cfg, port).unwrap();
        let space = dev.config_space();
        assert_eq!(space.len(), 24);
        assert_eq!(&space[0..6], &mac);
        assert_eq!(&space[6..8], &1u16.to_le_bytes(), "LINK_UP");
        assert_eq!(&space[8..10], &1u16.to_le_bytes(), "one queue pair");
        assert_eq!(&space[10..12], &9000u16.to_le_bytes(), "mtu");
        assert_eq!(dev.read_config(0, 6), mac);
        dev.set_link_up(false);
        assert_eq!(&dev.config_space()[6..8], &[0, 0]);
        assert_eq!(dev.device_type(), VIRTIO_ID_NET);
        assert_eq!(dev.num_queues(), 2);
        assert_eq!(dev.features() & (1 << 17), 0, "no CTRL_VQ");
        assert!(dev.queue_handler(0).is_ok() && dev.queue_handler(1).is_ok());
        assert!(dev.queue_handler(2).is_err());
        assert!(dev.write_config(0, &[1]).is_err(), "the MAC is read-only");
        let tiny = NetConfig {
            mtu: 10,
            ..NetConfig::new(mac)
        };
        let port = Switch::new("dev2").port().unwrap();
        assert!(NetDevice::new(tiny, port).is_err());
    }
}
