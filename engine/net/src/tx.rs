//! The transmit queue: each chain is a `virtio_net_hdr_v1` and an Ethernet frame in
//! device-readable buffers. The frame is copied out of driver memory (checked: the driver is
//! hostile) and handed to the backend; the chain completes at once with used length 0.

use std::sync::Arc;

use virtiod_core::{Chain, GuestMem, Outcome, QueueHandler};
use vm_memory::Bytes;

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

/// The handler of the transmit queue (queue 1).
pub struct TxQueue {
    backend: Arc<dyn NetBackend>,
    max_frame: usize,
    /// Header and frame of the chain being sent (reused).
    buf: Vec<u8>,
}

impl TxQueue {
    /// A handler sending frames of at most `max_frame` bytes to `backend`.
    pub fn new(backend: Arc<dyn NetBackend>, max_frame: usize) -> Self {
        Self {
            backend,
            max_frame,
            buf: Vec::with_capacity(NET_HDR_LEN + max_frame),
        }
    }
}

impl QueueHandler for TxQueue {
    fn start(&mut self, chain: &Chain, mem: &Arc<GuestMem>) -> Outcome {
        let stats = self.backend.stats();
        match read_tx(chain, mem, self.max_frame, &mut self.buf) {
            Ok(()) => {
                let frame = &self.buf[NET_HDR_LEN..];
                PortStats::frame(&stats.tx_packets, &stats.tx_bytes, frame.len());
                self.backend.transmit(frame);
            }
            Err(err) => {
                tracing::debug!(head = chain.head(), %err, "dropping a tx chain");
                match err {
                    TxError::TooBig { .. } => PortStats::bump(&stats.tx_too_big),
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
        assert!(b.receive(&mut got));
        assert_eq!(got, &p[NET_HDR_LEN..]);
        assert!(!b.receive(&mut got), "dropped frames are not forwarded");
        // The device wrote nothing into driver memory.
        let mut all = vec![0; MEM_LEN];
        m.read_slice(&mut all, vm_memory::GuestAddress(0)).unwrap();
        all[0x1000..0x1000 + p.len()].fill(CANARY);
        assert!(all.iter().all(|&b| b == CANARY));
    }
}
