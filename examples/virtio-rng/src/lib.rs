//! An example virtio device on virtiod's core that is not virtio-blk: virtio-rng (an entropy
//! source), written only against the public API of `virtiod-core`.
//!
//! A device is two small pieces:
//! - [`RngDevice`] implements [`Device`]: what the driver sees (device id
//!   `VIRTIO_ID_RNG`, feature bits, an empty configuration space, one queue);
//! - [`RngQueue`] implements [`QueueHandler`]: it executes the requests of that queue. A
//!   virtio-rng request is a chain of device-writable buffers, which it fills with random
//!   bytes from the operating system (`getrandom`) and answers at once.
//!
//! The transports of the core serve it unchanged: the `virtiod-rng` binary of this crate hands
//! it to `virtiod_vhost_user::VhostUserDevice`; `virtiod_vduse::VduseServer::create` would
//! serve it through VDUSE.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtiod_core::{
    Chain, Device, DeviceError, GuestMem, Outcome, QueueHandler, F_EVENT_IDX, F_INDIRECT_DESC,
    F_VERSION_1,
};
use vm_memory::Bytes;

/// Feature bits offered: virtio 1.x, plus the ring features the core implements.
pub const FEATURES: u64 = F_VERSION_1 | F_EVENT_IDX | F_INDIRECT_DESC;

/// Default largest queue size the driver may choose.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;

/// Most bytes written for one request: a driver asking for more gets this many (the device
/// may write fewer bytes than the buffers hold; the used length says how many).
pub const MAX_BYTES_PER_REQUEST: u32 = 1 << 20;

/// Random bytes are drawn from the operating system in chunks of this size.
const CHUNK: usize = 16 << 10;

/// A virtio-rng device: one request queue, no configuration space.
#[derive(Debug, Clone)]
pub struct RngDevice {
    queue_size: u16,
}

impl RngDevice {
    /// A device whose queue holds up to `queue_size` descriptors (a power of two).
    pub fn new(queue_size: u16) -> Self {
        Self { queue_size }
    }
}

impl Default for RngDevice {
    /// A device with a queue of [`DEFAULT_QUEUE_SIZE`].
    fn default() -> Self {
        Self::new(DEFAULT_QUEUE_SIZE)
    }
}

impl Device for RngDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn features(&self) -> u64 {
        FEATURES
    }

    /// virtio-rng has no configuration space.
    fn config_space(&self) -> Vec<u8> {
        Vec::new()
    }

    fn num_queues(&self) -> u16 {
        1
    }

    fn max_queue_size(&self) -> u16 {
        self.queue_size
    }

    fn queue_handler(&self, index: u16) -> Result<Box<dyn QueueHandler>, DeviceError> {
        if index != 0 {
            return Err(DeviceError::Queue {
                queue: index,
                reason: "virtio-rng has one queue".into(),
            });
        }
        Ok(Box::new(RngQueue::new()))
    }
}

/// The request handler of the virtio-rng queue: fills each request's buffers with random
/// bytes and completes it at once (so it never has requests in flight).
#[derive(Debug)]
pub struct RngQueue {
    /// Random bytes on their way into the driver's buffers.
    chunk: Vec<u8>,
}

impl RngQueue {
    /// A handler with its chunk buffer.
    pub fn new() -> Self {
        Self {
            chunk: vec![0; CHUNK],
        }
    }

    /// Fill the writable buffers of `chain` with random bytes; returns how many bytes were
    /// written. A chain the device must refuse (unterminated, or with a device-readable
    /// buffer: virtio-rng reads nothing) gets 0 and its memory is not touched. Writing
    /// stops at the first buffer that is not in the driver's memory, or after
    /// [`MAX_BYTES_PER_REQUEST`].
    pub fn fill(&mut self, chain: &Chain, mem: &GuestMem) -> u32 {
        let head = chain.head();
        if !chain.terminated() {
            tracing::debug!(head, "refusing an unterminated chain");
            return 0;
        }
        if chain.descs().iter().any(|d| !d.writable) {
            tracing::debug!(head, "refusing a chain with a device-readable buffer");
            return 0;
        }
        let mut written: u32 = 0;
        for desc in chain.descs() {
            let mut addr = desc.addr;
            let mut left = desc.len;
            while left > 0 && written < MAX_BYTES_PER_REQUEST {
                let n = left.min(MAX_BYTES_PER_REQUEST - written) as usize;
                let bytes = &mut self.chunk[..n.min(CHUNK)];
                if let Err(err) = getrandom::fill(bytes) {
                    tracing::warn!(head, %err, "the operating system gave no random bytes");
                    return written;
                }
                if let Err(err) = mem.write_slice(bytes, addr) {
                    tracing::debug!(head, addr = addr.0, %err, "buffer outside the driver's memory");
                    return written;
                }
                let n = bytes.len() as u32; // at most CHUNK
                written += n;
                left -= n;
                match addr.0.checked_add(u64::from(n)) {
                    Some(next) => addr.0 = next,
                    None => return written,
                }
            }
        }
        written
    }
}

impl Default for RngQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl QueueHandler for RngQueue {
    /// Every request completes at once: there is always room for one more.
    fn can_start(&self) -> bool {
        true
    }

    fn start(&mut self, chain: &Chain, mem: &Arc<GuestMem>) -> Outcome {
        Outcome::Done {
            used_len: self.fill(chain, mem),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor;
    use vm_memory::GuestAddress;

    const CANARY: u8 = 0xCC;
    const MEM_LEN: usize = 0x10000;

    fn mem() -> GuestMem {
        let m = GuestMem::from_ranges(&[(GuestAddress(0), MEM_LEN)]).unwrap();
        m.write_slice(&[CANARY; MEM_LEN], GuestAddress(0)).unwrap();
        m
    }

    fn get(m: &GuestMem, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        m.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// A chain of (addr, len, writable) buffers, linked in order.
    fn chain(bufs: &[(u64, u32, bool)]) -> Chain {
        let descs = bufs.iter().enumerate().map(|(i, &(addr, len, writable))| {
            let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            Descriptor::new(addr, len, flags as u16, (i + 1) as u16)
        });
        let mut c = Chain::new();
        c.collect_descriptors(0, descs);
        c
    }

    #[test]
    fn fills_every_writable_buffer_and_nothing_else() {
        let m = mem();
        let c = chain(&[(0x1000, 64, true), (0x3000, 4096, true)]);
        assert_eq!(RngQueue::new().fill(&c, &m), 64 + 4096);
        assert_ne!(get(&m, 0x1000, 64), vec![CANARY; 64]);
        assert_ne!(get(&m, 0x3000, 4096), vec![CANARY; 4096]);
        assert_eq!(
            get(&m, 0x1040, 0x3000 - 0x1040),
            vec![CANARY; 0x3000 - 0x1040]
        );
        assert_eq!(get(&m, 0x4000, 0x1000), vec![CANARY; 0x1000]);
    }

    #[test]
    fn a_readable_buffer_or_an_unterminated_chain_is_refused_untouched() {
        let m = mem();
        let mut q = RngQueue::new();
        let c = chain(&[(0x1000, 16, false), (0x2000, 64, true)]);
        assert_eq!(q.fill(&c, &m), 0);
        let mut cut = Chain::new();
        let looping = Descriptor::new(
            0x2000,
            64,
            (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
            0,
        );
        cut.collect_descriptors(0, std::iter::once(looping));
        assert!(!cut.terminated());
        assert_eq!(q.fill(&cut, &m), 0);
        assert_eq!(get(&m, 0, MEM_LEN), vec![CANARY; MEM_LEN]);
    }

    #[test]
    fn stops_at_memory_the_driver_does_not_have() {
        let m = mem();
        let end = MEM_LEN as u64;
        let c = chain(&[(end - 32, 32, true), (end + 0x1000, 64, true)]);
        assert_eq!(RngQueue::new().fill(&c, &m), 32);
    }

    #[test]
    fn two_requests_get_different_bytes_and_the_device_says_what_it_is() {
        let m = mem();
        let mut q = RngQueue::new();
        q.fill(&chain(&[(0x1000, 256, true)]), &m);
        q.fill(&chain(&[(0x2000, 256, true)]), &m);
        assert_ne!(get(&m, 0x1000, 256), get(&m, 0x2000, 256));
        let dev = RngDevice::default();
        assert_eq!(dev.device_type(), VIRTIO_ID_RNG);
        assert_eq!(dev.num_queues(), 1);
        assert!(dev.config_space().is_empty());
        assert!(dev.queue_handler(0).is_ok() && dev.queue_handler(1).is_err());
    }
}
