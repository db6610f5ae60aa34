//! The transmit queue: each chain is a `virtio_net_hdr_v1` and an Ethernet frame in
//! device-readable buffers. Header and frame are copied out of driver memory (checked: the
//! driver is hostile; the header against the offloads the driver accepted) and handed to the
//! backend; the chain completes at once with used length 0.

use std::sync::Arc;

use virtiod_core::{Chain, GuestMem, Outcome, QueueHandler};
use vm_memory::Bytes;

use crate::offload::MAX_GSO_FRAME;
use crate::offload::{check_tx, HdrError, NetHdr, F_HOST_TSO4, F_HOST_TSO6, GSO_NONE};
use crate::{NetBackend, PortStats, ETH_HLEN, NET_HDR_LEN};

/// Why a tx chain was refused (the chain completes with used length 0, the frame is dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    /// The chain loops, is cut short, or breaks a rule of the core.
    #[error("the chain is not terminated")]
    NotTerminated,
    /// A tx chain holds only device-readable buffers.
    #[error("the chain has a device-writable descriptor")]
    Writable,
    /// A buffer is not (wholly) in the driver's memory.
    #[error("a buffer is outside the driver's memory")]
    OutsideMemory,
    /// Shorter than the virtio-net header and an Ethernet header.
    #[error("{len} bytes: shorter than the virtio-net and Ethernet headers")]
    TooShort {
        /// Bytes in the chain.
        len: u64,
    },
    /// The frame is above MTU + Ethernet header + VLAN tag.
    #[error("a frame of {len} bytes is above the largest of {max}")]
    TooBig {
        /// Frame bytes (without the virtio-net header).
        len: u64,
        /// Largest frame allowed.
        max: usize,
    },
    /// The virtio-net header is refused.
    #[error("bad virtio-net header: {0}")]
    Header(#[from] HdrError),
}

/// Copy the header and frame of tx `chain` into `buf` (replacing its contents); the frame
/// is `buf[NET_HDR_LEN..]`. Nothing is copied from a chain that is refused.
pub fn read_tx(
    chain: &Chain,
    mem: &GuestMem,
    max_frame: usize,
    buf: &mut Vec<u8>,
) -> Result<(), TxError> {
    if !chain.terminated() {
        return Err(TxError::NotTerminated);
    }
    if chain.descs().iter().any(|d| d.writable) {
        return Err(TxError::Writable);
    }
    if chain.faults_in(mem) {
        return Err(TxError::OutsideMemory);
    }
    let len: u64 = chain.descs().iter().map(|d| u64::from(d.len)).sum();
    if len < (NET_HDR_LEN + ETH_HLEN) as u64 {
        return Err(TxError::TooShort { len });
    }
    let frame_len = len - NET_HDR_LEN as u64;
    if frame_len > max_frame as u64 {
        return Err(TxError::TooBig {
            len: frame_len,
            max: max_frame,
        });
    }
    buf.resize(len as usize, 0);
    let mut at = 0;
    for d in chain.descs() {
        let n = d.len as usize;
        mem.read_slice(&mut buf[at..at + n], d.addr)
            .map_err(|_| TxError::OutsideMemory)?;
        at += n;
    }
    Ok(())
}

/// Check the header of the frame in `buf` (header and frame of a tx chain) against the
/// features the driver accepted, `acked`: a frame that is not GSO must be at most
/// `max_frame` bytes.
pub fn check_frame(buf: &mut [u8], acked: u64, max_frame: usize) -> Result<(), TxError> {
    check_tx(buf, acked)?;
    let len = buf.len() - NET_HDR_LEN;
    if NetHdr::read(buf).gso_type == GSO_NONE && len > max_frame {
        return Err(TxError::TooBig {
            len: len as u64,
            max: max_frame,
        });
    }
    Ok(())
}

/// The handler of the transmit queue (queue 1).
pub struct TxQueue {
    backend: Arc<dyn NetBackend>,
    max_frame: usize,
    /// The features the driver accepted.
    acked: u64,
    /// Header and frame of the chain being sent (reused).
    buf: Vec<u8>,
}

impl TxQueue {
    /// A handler sending frames of at most `max_frame` bytes (GSO frames: 64 KiB and an
    /// Ethernet header, when the driver accepted HOST_TSO4/6) to `backend`.
    pub fn new(backend: Arc<dyn NetBackend>, max_frame: usize) -> Self {
        Self {
            backend,
            max_frame,
            acked: 0,
            buf: Vec::with_capacity(NET_HDR_LEN + max_frame),
        }
    }

    /// Largest frame a chain may hold, GSO frames included.
    fn chain_limit(&self) -> usize {
        if self.acked & (F_HOST_TSO4 | F_HOST_TSO6) != 0 {
            self.max_frame.max(MAX_GSO_FRAME)
        } else {
            self.max_frame
        }
    }
}

impl QueueHandler for TxQueue {
    fn driver_features(&mut self, acked: u64) {
        self.acked = acked;
    }

    fn start(&mut self, chain: &Chain, mem: &Arc<GuestMem>) -> Outcome {
        let stats = self.backend.stats();
        let read = read_tx(chain, mem, self.chain_limit(), &mut self.buf)
            .and_then(|()| check_frame(&mut self.buf, self.acked, self.max_frame));
        match read {
            Ok(()) => {
                let len = self.buf.len() - NET_HDR_LEN;
                PortStats::frame(&stats.tx_packets, &stats.tx_bytes, len);
                self.backend.transmit(&self.buf);
            }
            Err(err) => {
                tracing::debug!(head = chain.head(), %err, "dropping a tx chain");
                match err {
                    TxError::TooBig { .. } => PortStats::bump(&stats.tx_too_big),
                    TxError::Header(_) => PortStats::bump(&stats.tx_bad_header),
                    _ => PortStats::bump(&stats.tx_malformed),
                }
            }
        }
        Outcome::Done { used_len: 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{chain, mem, put, CANARY, MEM_LEN};
    use crate::Switch;

    const MAX: usize = 1518;

    fn packet(frame_len: usize) -> Vec<u8> {
        let mut p = vec![0u8; NET_HDR_LEN];
        p.extend((0..frame_len).map(|i| i as u8));
        p
    }

    #[test]
    fn reads_header_and_frame_across_descriptors() {
        let m = mem();
        let p = packet(60);
        put(&m, 0x1000, &p[..NET_HDR_LEN]);
        put(&m, 0x2000, &p[NET_HDR_LEN..40]);
        put(&m, 0x3000, &p[40..]);
        let c = chain(&[
            (0x1000, NET_HDR_LEN as u32, false),
            (0x2000, 28, false),
            (0x3000, (p.len() - 40) as u32, false),
        ]);
        let mut buf = Vec::new();
        read_tx(&c, &m, MAX, &mut buf).unwrap();
        assert_eq!(buf, p);
        // The largest frame passes, one byte more does not.
        let c = chain(&[(0x1000, (NET_HDR_LEN + MAX) as u32, false)]);
        assert!(read_tx(&c, &m, MAX, &mut buf).is_ok());
        let c = chain(&[(0x1000, (NET_HDR_LEN + MAX + 1) as u32, false)]);
        assert_eq!(
            read_tx(&c, &m, MAX, &mut buf),
            Err(TxError::TooBig {
                len: MAX as u64 + 1,
                max: MAX
            })
        );
    }

    #[test]
    fn every_malformed_shape_is_refused() {
        let m = mem();
        let mut buf = Vec::new();
        let cases = [
            (
                chain(&[(0x1000, 12, false), (0x2000, 64, true)]),
                TxError::Writable,
            ),
            (chain(&[(0x1000, 11, false)]), TxError::TooShort { len: 11 }),
            (chain(&[(0x1000, 12, false)]), TxError::TooShort { len: 12 }),
            (
                chain(&[(0x1000, 12, false), (0x2000, 13, false)]),
                TxError::TooShort { len: 25 },
            ),
            (
                chain(&[(MEM_LEN as u64 - 8, 64, false)]),
                TxError::OutsideMemory,
            ),
            (
                chain(&[(0x1000, 12, false), (u64::MAX - 8, 64, false)]),
                TxError::OutsideMemory,
            ),
            (
                chain(&[(0x1000, u32::MAX, false), (0x1000, u32::MAX, false)]),
                TxError::OutsideMemory,
            ),
        ];
        for (c, want) in cases {
            assert_eq!(read_tx(&c, &m, MAX, &mut buf), Err(want));
        }
        let mut cut = Chain::new();
        let looping = virtio_queue::desc::split::Descriptor::new(0x1000, 64, 1, 0);
        cut.collect_descriptors(0, std::iter::once(looping));
        assert_eq!(
            read_tx(&cut, &m, MAX, &mut buf),
            Err(TxError::NotTerminated)
        );
    }

    #[test]
    fn the_handler_sends_good_frames_and_counts_dropped_ones_writing_nothing() {
        let m = Arc::new(mem());
        let sw = Switch::new("tx");
        let (a, b) = (sw.port().unwrap(), sw.port().unwrap());
        let mut q = TxQueue::new(a.clone(), MAX);
        let mut p = packet(60);
        p[NET_HDR_LEN..NET_HDR_LEN + 6].copy_from_slice(&[0xff; 6]);
        put(&m, 0x1000, &p);
        let good = chain(&[(0x1000, p.len() as u32, false)]);
        assert_eq!(q.start(&good, &m), Outcome::Done { used_len: 0 });
        let big = chain(&[(0x1000, (NET_HDR_LEN + MAX + 4) as u32, false)]);
        assert_eq!(q.start(&big, &m), Outcome::Done { used_len: 0 });
        let writable = chain(&[(0x1000, p.len() as u32, true)]);
        assert_eq!(q.start(&writable, &m), Outcome::Done { used_len: 0 });
        let s = a.stats().snapshot();
        assert_eq!((s.tx_packets, s.tx_bytes), (1, 60));
        assert_eq!((s.tx_too_big, s.tx_malformed), (1, 1));
        let mut got = Vec::new();
        assert!(b.receive(0, &mut got));
        assert_eq!(got, p);
        assert!(!b.receive(0, &mut got), "dropped frames are not forwarded");
        // The device wrote nothing into driver memory.
        let mut all = vec![0; MEM_LEN];
        m.read_slice(&mut all, vm_memory::GuestAddress(0)).unwrap();
        all[0x1000..0x1000 + p.len()].fill(CANARY);
        assert!(all.iter().all(|&b| b == CANARY));
    }

    #[test]
    fn headers_are_checked_against_the_accepted_offloads() {
        use crate::offload::{F_CSUM, F_GUEST_CSUM, F_HOST_TSO4, GSO_TCPV4, HDR_F_NEEDS_CSUM};
        let m = Arc::new(mem());
        let sw = Switch::new("tx-hdr");
        let (a, b) = (sw.port().unwrap(), sw.port().unwrap());
        b.set_guest_features(F_GUEST_CSUM);
        let mut q = TxQueue::new(a.clone(), MAX);
        // A partial checksum before CSUM is accepted: refused; after: sent as it is.
        let mut p = packet(60);
        p[NET_HDR_LEN..NET_HDR_LEN + 6].copy_from_slice(&[0xff; 6]);
        p[0] = HDR_F_NEEDS_CSUM;
        p[6] = 14; // csum_start
        p[8] = 6; // csum_offset
        put(&m, 0x1000, &p);
        let c = chain(&[(0x1000, p.len() as u32, false)]);
        q.start(&c, &m);
        assert_eq!(a.stats().snapshot().tx_bad_header, 1);
        q.driver_features(F_CSUM);
        q.start(&c, &m);
        let mut got = Vec::new();
        assert!(b.receive(0, &mut got));
        assert_eq!(got, p, "as it is, to a driver with GUEST_CSUM");
        // An 8000-byte frame: too big without GSO, a bad header as a GSO frame that is not
        // TCP, even with HOST_TSO4 accepted.
        let mut big = packet(8000);
        big[1] = GSO_TCPV4;
        big[4] = 100; // gso_size
        big[0] = HDR_F_NEEDS_CSUM;
        put(&m, 0x2000, &big);
        let c = chain(&[(0x2000, big.len() as u32, false)]);
        q.start(&c, &m);
        assert_eq!(a.stats().snapshot().tx_too_big, 1, "HOST_TSO4 not accepted");
        q.driver_features(F_CSUM | F_HOST_TSO4);
        q.start(&c, &m);
        let s = a.stats().snapshot();
        assert_eq!((s.tx_too_big, s.tx_bad_header, s.tx_packets), (1, 2, 1));
    }
}
