//! Per-device request counters, shared by the queue workers and read by metrics.

use std::sync::atomic::{AtomicU64, Ordering};

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
}

impl QueueStats {
    pub(crate) fn completed(&self, kind: OpKind, bytes: u64, ok: bool) {
        self.requests[kind as usize].fetch_add(1, Ordering::Relaxed);
        self.bytes[kind as usize].fetch_add(bytes, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
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

    fn sum(&self, f: impl Fn(&QueueStats) -> &AtomicU64) -> u64 {
        self.queues
            .iter()
            .map(|q| f(q).load(Ordering::Relaxed))
            .sum()
    }
}
