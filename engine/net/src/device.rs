//! The virtio-net device: what the driver sees (features, configuration space, queue pairs
//! and, where the transport allows it, the control queue), and the handlers of its queues.

use std::mem::offset_of;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{self as vn, virtio_net_config, VIRTIO_NET_S_LINK_UP};
use virtiod_core::{Device, DeviceError, QueueHandler, F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1};

use crate::ctrl::CtrlQueue;
use crate::frames::locked;
use crate::{
    Mac, NetBackend, NetError, RxQueue, TxQueue, ETH_HLEN, F_MAC, F_MRG_RXBUF, F_MTU, F_STATUS,
    MAX_QUEUE_PAIRS, VLAN_HLEN,
};

/// Feature bits always offered, with the checksum and TCP segmentation offloads both ways
/// ([`crate::offload::OFFLOAD_FEATURES`]). With a control queue ([`NetConfig::control_queue`])
/// [`CTRL_FEATURES`] are added, and MQ with more than one queue pair.
pub const FEATURES: u64 = F_VERSION_1
    | F_EVENT_IDX
    | F_INDIRECT_DESC
    | F_MAC
    | F_STATUS
    | F_MTU
    | F_MRG_RXBUF
    | crate::offload::OFFLOAD_FEATURES;
/// Features of the control queue: the queue, rx-mode and MAC address commands.
pub const CTRL_FEATURES: u64 = (1 << vn::VIRTIO_NET_F_CTRL_VQ)
    | (1 << vn::VIRTIO_NET_F_CTRL_RX)
    | (1 << vn::VIRTIO_NET_F_CTRL_MAC_ADDR);
/// `VIRTIO_NET_F_MQ`: several queue pairs (needs the control queue).
pub const F_MQ: u64 = 1 << vn::VIRTIO_NET_F_MQ;
/// MTU when none is given.
pub const DEFAULT_MTU: u16 = 1500;
/// Largest queue size the driver may choose, when none is given.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Smallest MTU (IPv4's minimum datagram).
const MIN_MTU: u16 = 68;

/// What a virtio-net device is configured with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig {
    /// The device's MAC address.
    pub mac: Mac,
    /// Largest payload of a frame (without Ethernet header).
    pub mtu: u16,
    /// Largest queue size the driver may choose (a power of two).
    pub queue_size: u16,
    /// Queue pairs (1 to [`MAX_QUEUE_PAIRS`]; more than one needs [`Self::control_queue`]).
    pub queue_pairs: u16,
    /// Offer the control queue: the transport allows it (vhost-user does, VDUSE refuses it).
    pub control_queue: bool,
}

impl NetConfig {
    /// A device with `mac`, [`DEFAULT_MTU`] and [`DEFAULT_QUEUE_SIZE`].
    pub fn new(mac: Mac) -> Self {
        Self {
            mac,
            mtu: DEFAULT_MTU,
            queue_size: DEFAULT_QUEUE_SIZE,
            queue_pairs: 1,
            control_queue: false,
        }
    }

    /// Largest frame the driver may send or receive: MTU + Ethernet header + a VLAN tag.
    pub fn max_frame(&self) -> usize {
        usize::from(self.mtu) + ETH_HLEN + VLAN_HLEN
    }
}

/// A virtio-net device whose frames go to one [`NetBackend`]. Queues: rx of pair `i` is
/// `2i`, tx `2i + 1`, then the control queue if offered.
pub struct NetDevice {
    config: NetConfig,
    backend: Arc<dyn NetBackend>,
    link_up: AtomicBool,
    /// The MAC address (the driver may change it with `MAC_ADDR_SET`).
    mac: Arc<Mutex<Mac>>,
}

impl NetDevice {
    /// A device configured by `config` whose frames go to `backend` (which has at least
    /// `config.queue_pairs` pairs); the link is up.
    pub fn new(config: NetConfig, backend: Arc<dyn NetBackend>) -> Result<Self, NetError> {
        if config.mtu < MIN_MTU {
            return Err(NetError::Mtu(config.mtu));
        }
        let pairs = config.queue_pairs;
        if pairs == 0 || pairs > MAX_QUEUE_PAIRS || pairs > backend.queue_pairs() {
            return Err(NetError::QueuePairs(pairs));
        }
        if pairs > 1 && !config.control_queue {
            return Err(NetError::MultiqueueWithoutControlQueue(pairs));
        }
        Ok(Self {
            mac: Arc::new(Mutex::new(config.mac)),
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
        let mut features = FEATURES;
        if self.config.control_queue {
            features |= CTRL_FEATURES;
            if self.config.queue_pairs > 1 {
                features |= F_MQ;
            }
        }
        features
    }

    /// `struct virtio_net_config`, little endian: mac, status, max_virtqueue_pairs, mtu;
    /// speed and duplex unknown; no RSS.
    fn config_space(&self) -> Vec<u8> {
        let mut space = vec![0u8; std::mem::size_of::<virtio_net_config>()];
        let mut put = |at: usize, bytes: &[u8]| space[at..at + bytes.len()].copy_from_slice(bytes);
        put(offset_of!(virtio_net_config, mac), &*locked(&self.mac));
        let status = if self.link_up.load(Ordering::Relaxed) {
            VIRTIO_NET_S_LINK_UP as u16
        } else {
            0
        };
        put(offset_of!(virtio_net_config, status), &status.to_le_bytes());
        put(
            offset_of!(virtio_net_config, max_virtqueue_pairs),
            &self.config.queue_pairs.to_le_bytes(),
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
        2 * self.config.queue_pairs + u16::from(self.config.control_queue)
    }

    fn max_queue_size(&self) -> u16 {
        self.config.queue_size
    }

    fn queue_handler(&self, index: u16) -> Result<Box<dyn QueueHandler>, DeviceError> {
        let max_frame = self.config.max_frame();
        let pairs = self.config.queue_pairs;
        if index < 2 * pairs && index.is_multiple_of(2) {
            Ok(Box::new(RxQueue::for_pair(
                self.backend.clone(),
                index / 2,
                // Mergeable until the driver's accepted features say otherwise
                // (`QueueHandler::driver_features`).
                true,
                usize::from(self.config.queue_size),
            )))
        } else if index < 2 * pairs {
            Ok(Box::new(TxQueue::new(self.backend.clone(), max_frame)))
        } else if index == 2 * pairs && self.config.control_queue {
            Ok(Box::new(CtrlQueue::new(
                self.backend.clone(),
                pairs,
                self.mac.clone(),
            )))
        } else {
            Err(DeviceError::Queue {
                queue: index,
                reason: format!(
                    "this virtio-net device has {pairs} queue pair(s) and {} control queue",
                    if self.config.control_queue { "a" } else { "no" }
                ),
            })
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

    #[test]
    fn queue_pairs_and_the_control_queue_where_the_transport_allows_it() {
        let mac = [0x52, 0x54, 0, 0, 0, 1];
        let sw = Switch::new("dev-mq");
        let two = NetConfig {
            queue_pairs: 2,
            control_queue: true,
            ..NetConfig::new(mac)
        };
        let dev = NetDevice::new(two, sw.port_with_pairs(2).unwrap()).unwrap();
        assert_eq!(dev.num_queues(), 5);
        assert_eq!(
            dev.features() & (CTRL_FEATURES | F_MQ),
            CTRL_FEATURES | F_MQ
        );
        assert_eq!(&dev.config_space()[8..10], &2u16.to_le_bytes());
        assert!((0..5).all(|q| dev.queue_handler(q).is_ok()));
        assert!(dev.queue_handler(5).is_err());
        // One pair with a control queue: no MQ. Two without (VDUSE): refused.
        let one = NetConfig {
            control_queue: true,
            ..NetConfig::new(mac)
        };
        let dev = NetDevice::new(one, sw.port().unwrap()).unwrap();
        assert_eq!((dev.num_queues(), dev.features() & F_MQ), (3, 0));
        let vduse = NetConfig {
            control_queue: false,
            ..two
        };
        assert!(matches!(
            NetDevice::new(vduse, sw.port_with_pairs(2).unwrap()),
            Err(NetError::MultiqueueWithoutControlQueue(2))
        ));
        assert!(matches!(
            NetDevice::new(two, sw.port().unwrap()),
            Err(NetError::QueuePairs(2))
        ));
    }
}
