//! The seam between the virtio-net queues and where frames go: one [`NetBackend`] per port
//! (the in-process [`crate::Switch`], a tap device). A frame crossing it is a
//! `virtio_net_hdr_v1` ([`crate::NET_HDR_LEN`] bytes, `num_buffers` unused) and the Ethernet
//! frame: the header carries the checksum and segmentation offloads.

use std::sync::atomic::{AtomicU64, Ordering};

use vmm_sys_util::eventfd::EventFd;

/// Where the frames of one virtio-net device go and come from.
///
/// The tx queues hand every frame the driver sent to [`Self::transmit`]. Each rx queue (one
/// per queue pair, by pair index) takes frames with [`Self::receive`] while it holds receive
/// buffers; it tells the backend so with [`Self::set_rx_ready`], and the backend signals
/// [`Self::rx_event`] of that pair when a frame is waiting while the queue is ready (the queue
/// thread sleeps on that eventfd). Frames are spread over the pairs the driver uses
/// ([`Self::set_queue_pairs`]) by flow.
pub trait NetBackend: Send + Sync {
    /// A frame the driver sent: the virtio-net header (checked against the features the
    /// driver accepted, [`crate::offload::check_tx`]) and the Ethernet frame.
    fn transmit(&self, frame: &[u8]);
    /// Move the next frame waiting for rx queue pair `pair` into `frame` (replacing its
    /// contents): a virtio-net header using only the offloads the driver accepted, and the
    /// Ethernet frame; false when none waits.
    fn receive(&self, pair: u16, frame: &mut Vec<u8>) -> bool;
    /// The features the port's driver accepted: which offloads its frames may use (a tap
    /// tells the kernel, `TUNSETOFFLOAD`; frames beyond them are finished in software).
    fn set_guest_features(&self, features: u64);
    /// The eventfd the backend signals when frames wait for the rx queue of `pair`, ready.
    fn rx_event(&self, pair: u16) -> &EventFd;
    /// Whether the rx queue of `pair` holds receive buffers. Becoming ready with frames
    /// waiting signals [`Self::rx_event`] at once.
    fn set_rx_ready(&self, pair: u16, ready: bool);
    /// Queue pairs the port has (the most the device may offer).
    fn queue_pairs(&self) -> u16;
    /// Spread received frames over the first `pairs` rx queues (the driver's choice; 1
    /// until it makes one).
    fn set_queue_pairs(&self, pairs: u16);
    /// The port's counters.
    fn stats(&self) -> &PortStats;
}

/// Counters of one port. "tx" is what the driver sent, "rx" what it received.
#[derive(Debug, Default)]
pub struct PortStats {
    /// Frames the driver sent that were handed to the backend.
    pub tx_packets: AtomicU64,
    /// Bytes of those frames (without the virtio-net header).
    pub tx_bytes: AtomicU64,
    /// Frames written into the driver's receive buffers.
    pub rx_packets: AtomicU64,
    /// Bytes of those frames (without the virtio-net header).
    pub rx_bytes: AtomicU64,
    /// tx chains refused as malformed (writable descriptors, shorter than the header and an
    /// Ethernet header, not terminated, outside memory).
    pub tx_malformed: AtomicU64,
    /// tx frames above MTU + 14 (+ 4 for a VLAN tag), or above 64 KiB + 18 for GSO frames.
    pub tx_too_big: AtomicU64,
    /// tx frames whose virtio-net header was refused (offsets beyond the frame, offloads the
    /// driver did not accept, unknown GSO types, GSO headers that are not TCP).
    pub tx_bad_header: AtomicU64,
    /// Frames for this port cut into TCP segments in software (its driver takes no GSO).
    pub rx_segmented: AtomicU64,
    /// Frames for this port dropped because they needed software offload work that could
    /// not be done (e.g. a GSO frame from a tap that is not TCP).
    pub rx_offload_dropped: AtomicU64,
    /// Frames for this port dropped because its queue of waiting frames was full (no
    /// receive buffers).
    pub rx_queue_full: AtomicU64,
    /// Frames for this port dropped because they do not fit the receive buffers.
    pub rx_too_big: AtomicU64,
    /// rx chains refused as malformed (readable descriptors, smaller than the header, not
    /// terminated, outside memory).
    pub rx_malformed: AtomicU64,
}

/// A snapshot of [`PortStats`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PortCounters {
    /// See [`PortStats::tx_packets`].
    pub tx_packets: u64,
    /// See [`PortStats::tx_bytes`].
    pub tx_bytes: u64,
    /// See [`PortStats::rx_packets`].
    pub rx_packets: u64,
    /// See [`PortStats::rx_bytes`].
    pub rx_bytes: u64,
    /// See [`PortStats::tx_malformed`].
    pub tx_malformed: u64,
    /// See [`PortStats::tx_too_big`].
    pub tx_too_big: u64,
    /// See [`PortStats::tx_bad_header`].
    pub tx_bad_header: u64,
    /// See [`PortStats::rx_segmented`].
    pub rx_segmented: u64,
    /// See [`PortStats::rx_offload_dropped`].
    pub rx_offload_dropped: u64,
    /// See [`PortStats::rx_queue_full`].
    pub rx_queue_full: u64,
    /// See [`PortStats::rx_too_big`].
    pub rx_too_big: u64,
    /// See [`PortStats::rx_malformed`].
    pub rx_malformed: u64,
}

impl PortStats {
    /// Count one (`counter += 1`).
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Count a frame of `len` bytes in `packets` and `bytes`.
    pub fn frame(packets: &AtomicU64, bytes: &AtomicU64, len: usize) {
        packets.fetch_add(1, Ordering::Relaxed);
        bytes.fetch_add(len as u64, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> PortCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PortCounters {
            tx_packets: get(&self.tx_packets),
            tx_bytes: get(&self.tx_bytes),
            rx_packets: get(&self.rx_packets),
            rx_bytes: get(&self.rx_bytes),
            tx_malformed: get(&self.tx_malformed),
            tx_too_big: get(&self.tx_too_big),
            tx_bad_header: get(&self.tx_bad_header),
            rx_segmented: get(&self.rx_segmented),
            rx_offload_dropped: get(&self.rx_offload_dropped),
            rx_queue_full: get(&self.rx_queue_full),
            rx_too_big: get(&self.rx_too_big),
            rx_malformed: get(&self.rx_malformed),
        }
    }
}
