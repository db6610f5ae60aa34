//! virtio-net as a device of virtiod's core.
//!
//! - [`NetDevice`] implements the core's `Device`: device id `VIRTIO_ID_NET`, the feature
//!   bits (VERSION_1, MAC, STATUS, MTU, MRG_RXBUF, the checksum and TCP segmentation
//!   offloads of [`offload`] and the ring features the core implements; the control queue
//!   and MQ where the transport allows them), the configuration space (`struct
//!   virtio_net_config`) and its queues: per pair `i`, queue `2i` receives ([`RxQueue`]),
//!   queue `2i + 1` transmits ([`TxQueue`]); then the control queue ([`CtrlQueue`]).
//! - [`NetBackend`] is the seam to where frames go: one backend per device (a *port*). The
//!   in-process [`Switch`] (`switch:NAME`) and a Linux tap interface ([`TapPort`],
//!   `tap:NAME`).
//!
//! ```text
//! driver tx chain ─► TxQueue::start (header + frame, checked) ─► NetBackend::transmit
//!                                                                  │ (switch: learn, forward)
//! driver rx buffer ─► RxQueue::start (kept) ◄── rx_event ◄── other port's queue of frames
//!                     RxQueue::reap: header + frame into the buffer(s) ─► used ring
//! ```
#![deny(missing_docs)]
#![deny(unsafe_code)]

mod backend;
mod ctrl;
mod device;
mod frames;
pub mod offload;
mod rx;
mod steer;
mod switch;
#[allow(unsafe_code)] // the tap ioctls, in tap/sys.rs only
mod tap;
mod tx;

pub use backend::{NetBackend, PortCounters, PortStats};
pub use ctrl::CtrlQueue;
pub use device::{
    NetConfig, NetDevice, CTRL_FEATURES, DEFAULT_MTU, DEFAULT_QUEUE_SIZE, FEATURES, F_MQ,
};
pub use frames::PORT_QUEUE_FRAMES;
pub use rx::RxQueue;
pub use steer::MAX_QUEUE_PAIRS;
pub use switch::{Mac, Switch, SwitchPort, MAC_AGEING, MAC_TABLE_SIZE};
pub use tap::{check_tap_name, TapPort, TUN_PATH};
pub use tx::{check_frame, TxError, TxQueue};

use virtio_bindings::virtio_net;

/// `VIRTIO_NET_F_MAC`: the configuration space holds the device's MAC address.
pub const F_MAC: u64 = 1 << virtio_net::VIRTIO_NET_F_MAC;
/// `VIRTIO_NET_F_STATUS`: the configuration space holds the link status.
pub const F_STATUS: u64 = 1 << virtio_net::VIRTIO_NET_F_STATUS;
/// `VIRTIO_NET_F_MTU`: the configuration space holds the MTU.
pub const F_MTU: u64 = 1 << virtio_net::VIRTIO_NET_F_MTU;
/// `VIRTIO_NET_F_MRG_RXBUF`: a received frame may span several receive buffers.
pub const F_MRG_RXBUF: u64 = 1 << virtio_net::VIRTIO_NET_F_MRG_RXBUF;

/// Bytes of `struct virtio_net_hdr_v1` (with VERSION_1 the header always has `num_buffers`).
pub const NET_HDR_LEN: usize = 12;
const _: () = assert!(std::mem::size_of::<virtio_net::virtio_net_hdr_v1>() == NET_HDR_LEN);
/// Bytes of an Ethernet header (destination, source, ethertype).
pub const ETH_HLEN: usize = 14;
/// Bytes of an 802.1Q VLAN tag.
pub const VLAN_HLEN: usize = 4;

/// Errors of the virtio-net device and its backends.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A switch needs a name.
    #[error("invalid switch name {0:?}: give switch:NAME with a non-empty NAME")]
    SwitchName(String),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// A tap name the kernel would refuse.
    #[error("invalid tap name {0:?}: give 1 to 15 bytes (IFNAMSIZ) without '/', ':' or spaces")]
    TapName(String),
    /// `/dev/net/tun` is missing (or the tun driver is not loaded).
    #[error("cannot open /dev/net/tun: {0}: load the tun module (modprobe tun)")]
    TunMissing(#[source] std::io::Error),
    /// Creating or attaching to a tap was refused.
    #[error("permission denied opening tap {0}: run with CAP_NET_ADMIN (or as the owner of a persistent tap)")]
    TapPermission(String),
    /// The (single-queue) tap is attached to another process already.
    #[error("tap {0} is busy: another process has it open")]
    TapBusy(String),
    /// The name is taken by an interface that is not a tap (or a tap with other flags).
    #[error("{0} exists and is not a tap without packet info: choose another name")]
    NotTap(String),
    /// Another tap operation failed.
    #[error("tap {name}: {what} failed: {source}")]
    Tap {
        /// The interface (or `/dev/net/tun`).
        name: String,
        /// What failed.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A number of queue pairs out of range, or above what the port has.
    #[error("{0} queue pairs: give 1 to 64 (and no more than the port was opened with)")]
    QueuePairs(u16),
    /// Several queue pairs without a control queue (VDUSE).
    #[error("{0} queue pairs need the control queue, which VDUSE refuses: give one queue pair (no --queues) over VDUSE, or serve over vhost-user")]
    MultiqueueWithoutControlQueue(u16),
    /// The MTU is outside what virtio-net and Ethernet allow.
    #[error("invalid MTU {0}: give a value from 68 to 65535")]
    Mtu(u16),
}

#[cfg(test)]
mod test_util {
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor;
    use virtiod_core::{Chain, GuestMem};
    use vm_memory::{Bytes, GuestAddress};

    pub const CANARY: u8 = 0xCC;
    pub const MEM_LEN: usize = 0x10000;

    /// Test memory filled with [`CANARY`].
    pub fn mem() -> GuestMem {
        let m = GuestMem::from_ranges(&[(GuestAddress(0), MEM_LEN)]).unwrap();
        m.write_slice(&[CANARY; MEM_LEN], GuestAddress(0)).unwrap();
        m
    }

    pub fn put(m: &GuestMem, addr: u64, bytes: &[u8]) {
        m.write_slice(bytes, GuestAddress(addr)).unwrap();
    }

    pub fn get(m: &GuestMem, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        m.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// A chain with head `head` of (addr, len, writable) buffers, linked in order.
    pub fn chain_at(head: u16, bufs: &[(u64, u32, bool)]) -> Chain {
        let descs = bufs.iter().enumerate().map(|(i, &(addr, len, writable))| {
            let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            Descriptor::new(addr, len, flags as u16, (i + 1) as u16)
        });
        let mut c = Chain::new();
        c.collect_descriptors(head, descs);
        c
    }

    pub fn chain(bufs: &[(u64, u32, bool)]) -> Chain {
        chain_at(0, bufs)
    }
}
