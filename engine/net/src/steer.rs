//! The receive side of a port with several queue pairs: one bounded queue of frames
//! ([`RxFrames`]) per receive queue, and the steering of each frame to one of them by its flow
//! (IP addresses and TCP/UDP ports; Ethernet addresses for other frames), so a flow stays on
//! one queue and keeps its order. Frames go to the first `active` queues only: the driver
//! chooses how many pairs it uses (`VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`; one until it says).

use std::sync::atomic::{AtomicU16, Ordering};

use vmm_sys_util::eventfd::EventFd;

use crate::backend::PortStats;
use crate::frames::RxFrames;
use crate::{NetError, ETH_HLEN, NET_HDR_LEN};

/// Most queue pairs a port has.
pub const MAX_QUEUE_PAIRS: u16 = 64;

/// The queues of frames of one port, one per receive queue.
#[derive(Debug)]
pub(crate) struct PortQueues {
    queues: Vec<RxFrames>,
    active: AtomicU16,
}

impl PortQueues {
    /// `pairs` queues (1 to [`MAX_QUEUE_PAIRS`]), the first one active.
    pub(crate) fn new(pairs: u16) -> Result<Self, NetError> {
        if pairs == 0 || pairs > MAX_QUEUE_PAIRS {
            return Err(NetError::QueuePairs(pairs));
        }
        let queues = (0..pairs)
            .map(|_| RxFrames::new())
            .collect::<Result<_, _>>()?;
        Ok(Self {
            queues,
            active: AtomicU16::new(1),
        })
    }

    /// Queue pairs of the port.
    pub(crate) fn pairs(&self) -> u16 {
        self.queues.len() as u16 // at most MAX_QUEUE_PAIRS
    }

    /// Frames waiting, all queues together.
    pub(crate) fn len(&self) -> usize {
        self.queues.iter().map(RxFrames::len).sum()
    }

    /// Queue `frame` (virtio-net header and Ethernet frame) on the queue of its flow.
    pub(crate) fn push(&self, frame: &[u8], stats: &PortStats) {
        let active = usize::from(self.active.load(Ordering::Relaxed)).clamp(1, self.queues.len());
        let queue = if active == 1 {
            0
        } else {
            (flow_hash(frame.get(NET_HDR_LEN..).unwrap_or_default()) % active as u32) as usize
        };
        self.queues[queue].push(frame, stats);
    }

    /// The queue of receive queue pair `pair` (the last one for a pair beyond them: the
    /// device never asks for one).
    pub(crate) fn queue(&self, pair: u16) -> &RxFrames {
        let last = self.queues.len() - 1;
        &self.queues[usize::from(pair).min(last)]
    }

    /// See [`crate::NetBackend::set_guest_features`].
    pub(crate) fn set_guest_features(&self, features: u64) {
        for q in &self.queues {
            q.set_guest_features(features);
        }
    }

    /// See [`crate::NetBackend::set_queue_pairs`].
    pub(crate) fn set_active(&self, pairs: u16) {
        self.active
            .store(pairs.clamp(1, self.pairs()), Ordering::Relaxed);
    }

    /// The rx eventfd of pair `pair`.
    pub(crate) fn event(&self, pair: u16) -> &EventFd {
        self.queue(pair).event()
    }
}

/// A hash of the flow of an Ethernet frame: IPv4/IPv6 addresses and, for TCP and UDP, the
/// ports; the Ethernet addresses for anything else. Never fails on short frames.
fn flow_hash(frame: &[u8]) -> u32 {
    // FNV-1a: small, and good enough to spread flows.
    let fnv = |mut h: u32, bytes: &[u8]| {
        for &b in bytes {
            h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
        h
    };
    let basis = 0x811c_9dc5;
    let ethertype = frame.get(12..14).map(|t| u16::from_be_bytes([t[0], t[1]]));
    let ip = &frame[ETH_HLEN.min(frame.len())..];
    let (addrs, proto, l4) = match ethertype {
        Some(0x0800) if ip.len() >= 20 => {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            (&ip[12..20], ip[9], ihl)
        }
        Some(0x86dd) if ip.len() >= 40 => (&ip[8..40], ip[6], 40),
        _ => return fnv(basis, frame.get(..12).unwrap_or(frame)),
    };
    let h = fnv(basis, addrs);
    match (proto, ip.get(l4..l4 + 4)) {
        (6 | 17, Some(ports)) => fnv(h, ports),
        _ => h,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A virtio-net header and a TCP/IPv4 frame from port `sport`.
    fn tcp(sport: u16) -> Vec<u8> {
        let mut f = vec![0; NET_HDR_LEN];
        f.extend_from_slice(&[0xff; 12]);
        f.extend_from_slice(&[0x08, 0x00, 0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0]);
        f.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
        f.extend_from_slice(&sport.to_be_bytes());
        f.extend_from_slice(&[0, 80]);
        f.extend_from_slice(&[0; 16]);
        f
    }

    #[test]
    fn flows_spread_over_the_active_queues_and_stay_on_one() {
        let stats = PortStats::default();
        let q = PortQueues::new(4).unwrap();
        // One active pair: everything on queue 0.
        for port in 0..32 {
            q.push(&tcp(port), &stats);
        }
        assert_eq!(q.queue(0).len(), 32);
        q.set_active(9); // clamped to the 4 pairs
        let mut f = Vec::new();
        while q.queue(0).pop(&mut f) {}
        for port in 0..64 {
            q.push(&tcp(port), &stats);
            q.push(&tcp(port), &stats);
        }
        let lens: Vec<usize> = (0..4).map(|i| q.queue(i).len()).collect();
        assert!(lens.iter().all(|&n| n > 0 && n % 2 == 0), "{lens:?}");
        assert_eq!(lens.iter().sum::<usize>(), 128);
        // A flow's frames land on one queue; short and odd frames do not panic.
        q.set_active(2);
        let before = [q.queue(0).len(), q.queue(1).len()];
        for _ in 0..3 {
            q.push(&tcp(7), &stats);
        }
        let grown = [q.queue(0).len() - before[0], q.queue(1).len() - before[1]];
        assert!(grown == [3, 0] || grown == [0, 3], "{grown:?}");
        q.push(&[0; 3], &stats);
        q.push(&[0; NET_HDR_LEN + 20], &stats);
        assert_eq!(q.queue(200).len(), q.queue(3).len(), "beyond: the last");
        assert!(PortQueues::new(0).is_err() && PortQueues::new(65).is_err());
    }
}
