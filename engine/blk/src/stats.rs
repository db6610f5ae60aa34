//! Per-device request counters, shared by the queue workers and read by metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (µs) of the request latency histogram buckets; one more bucket counts the
/// rest. Latency is from backend submit to backend completion.
pub const LATENCY_BOUNDS_US: [u64; 15] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    1_000_000,
];

/// The request kinds counted separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// VIRTIO_BLK_T_IN
    Read = 0,
    /// VIRTIO_BLK_T_OUT
    Write = 1,
    /// VIRTIO_BLK_T_FLUSH
    Flush = 2,
    /// VIRTIO_BLK_T_DISCARD
    Discard = 3,
    /// VIRTIO_BLK_T_WRITE_ZEROES
    WriteZeroes = 4,
    /// VIRTIO_BLK_T_GET_ID and anything else
    Other = 5,
}

impl OpKind {
    /// All kinds, in index order.
    pub const ALL: [OpKind; 6] = [
        OpKind::Read,
        OpKind::Write,
        OpKind::Flush,
        OpKind::Discard,
        OpKind::WriteZeroes,
        OpKind::Other,
    ];

    /// Lower-case name used in metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Flush => "flush",
            OpKind::Discard => "discard",
            OpKind::WriteZeroes => "write_zeroes",
            OpKind::Other => "other",
        }
    }
}

/// Counters of one queue (written by one thread only, so relaxed atomics suffice).
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Completed requests by kind.
    pub requests: [AtomicU64; 6],
    /// Data bytes by kind.
    pub bytes: [AtomicU64; 6],
    /// Requests completed with an error status.
    pub errors: AtomicU64,
    /// Requests currently in flight.
    pub in_flight: AtomicU64,
    /// Backend requests by latency bucket (see [`LATENCY_BOUNDS_US`]; not cumulative).
    pub latency_buckets: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
    /// Sum of those latencies in nanoseconds.
    pub latency_sum_ns: AtomicU64,
}

impl QueueStats {
    pub(crate) fn completed(&self, kind: OpKind, bytes: u64, ok: bool) {
        self.requests[kind as usize].fetch_add(1, Ordering::Relaxed);
        self.bytes[kind as usize].fetch_add(bytes, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn observe_latency(&self, latency: Duration) {
        let us = latency.as_micros();
        let bucket = LATENCY_BOUNDS_US
            .iter()
            .position(|&bound| us <= u128::from(bound))
            .unwrap_or(LATENCY_BOUNDS_US.len());
        self.latency_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.latency_sum_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

/// Counters of a whole device: one [`QueueStats`] per queue, no sharing on the hot path.
#[derive(Debug, Default)]
pub struct Stats {
    /// One entry per queue.
    pub queues: Vec<QueueStats>,
}

impl Stats {
    /// Counters for a device with `num_queues` queues.
    pub fn new(num_queues: usize) -> Self {
        Self {
            queues: (0..num_queues).map(|_| QueueStats::default()).collect(),
        }
    }

    /// Total completed requests of `kind` over all queues.
    pub fn requests(&self, kind: OpKind) -> u64 {
        self.sum(|q| &q.requests[kind as usize])
    }

    /// Total data bytes of `kind` over all queues.
    pub fn bytes(&self, kind: OpKind) -> u64 {
        self.sum(|q| &q.bytes[kind as usize])
    }

    /// Total error completions.
    pub fn errors(&self) -> u64 {
        self.sum(|q| &q.errors)
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> u64 {
        self.sum(|q| &q.in_flight)
    }

    /// Backend request latencies over all queues: per-bucket counts (not cumulative, one
    /// more than [`LATENCY_BOUNDS_US`]) and the sum in nanoseconds.
    pub fn latency(&self) -> (Vec<u64>, u64) {
        let buckets = (0..=LATENCY_BOUNDS_US.len())
            .map(|i| self.sum(|q| &q.latency_buckets[i]))
            .collect();
        (buckets, self.sum(|q| &q.latency_sum_ns))
    }

    fn sum(&self, f: impl Fn(&QueueStats) -> &AtomicU64) -> u64 {
        self.queues
            .iter()
            .map(|q| f(q).load(Ordering::Relaxed))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_lands_in_its_bucket() {
        let stats = Stats::new(2);
        stats.queues[0].observe_latency(Duration::from_micros(10));
        stats.queues[1].observe_latency(Duration::from_micros(11));
        stats.queues[1].observe_latency(Duration::from_secs(2));
        let (buckets, sum_ns) = stats.latency();
        assert_eq!(buckets.len(), LATENCY_BOUNDS_US.len() + 1);
        assert_eq!(
            (buckets[0], buckets[1], buckets[LATENCY_BOUNDS_US.len()]),
            (1, 1, 1)
        );
        assert_eq!(buckets.iter().sum::<u64>(), 3);
        assert_eq!(sum_ns, 2_000_021_000);
    }
}
