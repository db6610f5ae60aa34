//! Per-device QoS: IOPS and bandwidth limits, each a token bucket with a burst, shared by
//! every queue of the device and changed while it serves.
//!
//! Reads are `IN` requests; writes are `OUT`, `DISCARD` and `WRITE_ZEROES`; bytes are the data
//! a request carries (a `DISCARD` or `WRITE_ZEROES` costs one operation and no bytes). `FLUSH`
//! and `GET_ID` are never limited. A request goes when every bucket that applies to it
//! (the total one and its direction's) holds its cost, or is full when the cost is over the
//! burst (a 1 MiB write under a 64 KiB burst goes from a full bucket into debt, and the next
//! request waits until the debt is paid), so the long-run rate is exactly the limit. A request over
//! the limit is never failed: its queue holds it and takes nothing more from the ring until it
//! may go ([`crate::BlkQueue`], woken by the core's timer).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::OpKind;

/// One limit: a rate and how much the bucket holds after an idle time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Operations (or bytes) per second; at least 1.
    pub per_sec: u64,
    /// What the bucket holds at most, i.e. how much may pass at once after an idle time
    /// (`None`: a tenth of a second at the rate, at least 1).
    pub burst: Option<u64>,
}

impl Rate {
    /// `per_sec` with the default burst.
    pub fn new(per_sec: u64) -> Self {
        Self {
            per_sec,
            burst: None,
        }
    }

    /// The burst in effect.
    pub fn effective_burst(&self) -> u64 {
        self.burst.unwrap_or(self.per_sec / 10).max(1)
    }
}

/// The limits of one device (`None`: no limit of that kind).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QosLimits {
    /// Requests per second, reads and writes together.
    pub iops: Option<Rate>,
    /// Read requests per second.
    pub read_iops: Option<Rate>,
    /// Write requests per second.
    pub write_iops: Option<Rate>,
    /// Bytes per second, reads and writes together.
    pub bps: Option<Rate>,
    /// Bytes read per second.
    pub read_bps: Option<Rate>,
    /// Bytes written per second.
    pub write_bps: Option<Rate>,
}

impl QosLimits {
    /// Whether no limit is set.
    pub fn is_unlimited(&self) -> bool {
        self.all().iter().all(Option::is_none)
    }

    /// The limits in bucket order: iops, read, write, then bps, read, write.
    fn all(&self) -> [Option<Rate>; 6] {
        [
            self.iops,
            self.read_iops,
            self.write_iops,
            self.bps,
            self.read_bps,
            self.write_bps,
        ]
    }
}

/// Which limits a request counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// `IN`.
    Read,
    /// `OUT`, `DISCARD`, `WRITE_ZEROES`.
    Write,
}

impl Class {
    /// The class of a request kind; `None` for kinds that are never limited.
    pub fn of(kind: OpKind) -> Option<Self> {
        match kind {
            OpKind::Read => Some(Class::Read),
            OpKind::Write | OpKind::Discard | OpKind::WriteZeroes => Some(Class::Write),
            OpKind::Flush | OpKind::Other => None,
        }
    }
}

/// What [`Qos::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// The request may go (its cost has been taken).
    Go,
    /// Ask again after this long (nothing was taken).
    Wait(Duration),
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    per_sec: f64,
    burst: f64,
    /// Tokens held; negative while in debt.
    level: f64,
}

impl Bucket {
    fn refill(&mut self, secs: f64) {
        self.level = (self.level + self.per_sec * secs).min(self.burst);
    }

    /// How long until the bucket holds `cost`, or is full when `cost` is over the burst.
    fn time_until(&self, cost: f64) -> Duration {
        let need = cost.min(self.burst);
        // Within rounding of the refill arithmetic counts as there.
        if self.level >= need - 1e-6 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((need - self.level) / self.per_sec)
    }
}

#[derive(Debug)]
struct State {
    limits: QosLimits,
    buckets: [Option<Bucket>; 6],
    last: Instant,
}

impl State {
    fn refill(&mut self, now: Instant) {
        let secs = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        for b in self.buckets.iter_mut().flatten() {
            b.refill(secs);
        }
    }
}

/// The token buckets of one device, shared by its queues (one small mutex taken once per
/// limited request; an unlimited device only reads an atomic flag).
#[derive(Debug)]
pub struct Qos {
    active: AtomicBool,
    state: Mutex<State>,
    throttled_requests: AtomicU64,
    throttled_ns: AtomicU64,
}

impl Qos {
    /// Buckets for `limits`, full at `now`.
    pub fn new(limits: QosLimits, now: Instant) -> Self {
        let qos = Self {
            active: AtomicBool::new(false),
            state: Mutex::new(State {
                limits: QosLimits::default(),
                buckets: [None; 6],
                last: now,
            }),
            throttled_requests: AtomicU64::new(0),
            throttled_ns: AtomicU64::new(0),
        };
        qos.set(limits, now);
        qos
    }

    /// No limits.
    pub fn unlimited() -> Self {
        Self::new(QosLimits::default(), Instant::now())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replace the limits (takes effect for the next request). A bucket whose limit stays
    /// keeps its level (cut to the new burst); a new one starts full.
    pub fn set(&self, limits: QosLimits, now: Instant) {
        let mut state = self.lock();
        state.refill(now);
        for (slot, rate) in state.buckets.iter_mut().zip(limits.all()) {
            *slot = rate.map(|rate| {
                let burst = rate.effective_burst() as f64;
                let level = slot.map_or(burst, |old| old.level.min(burst));
                Bucket {
                    per_sec: rate.per_sec.max(1) as f64,
                    burst,
                    level,
                }
            });
        }
        state.limits = limits;
        self.active.store(!limits.is_unlimited(), Ordering::Release);
    }

    /// The limits in effect.
    pub fn limits(&self) -> QosLimits {
        self.lock().limits
    }

    /// Whether any limit is set.
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// May a request of `class` carrying `bytes` go at `now`? If so its cost is taken.
    pub fn admit(&self, class: Class, bytes: u64, now: Instant) -> Admit {
        if !self.is_active() {
            return Admit::Go;
        }
        let mut state = self.lock();
        state.refill(now);
        // (bucket, cost): the total and the direction's operation buckets, then the byte
        // buckets (a request without data costs no bytes).
        let (read_or_write_ops, read_or_write_bytes) = match class {
            Class::Read => (1, 4),
            Class::Write => (2, 5),
        };
        let b = bytes as f64;
        let costs = [
            (0, 1.0),
            (read_or_write_ops, 1.0),
            (3, b),
            (read_or_write_bytes, b),
        ];
        let applies = |&(idx, cost): &(usize, f64)| cost > 0.0 && state.buckets[idx].is_some();
        let wait = costs
            .iter()
            .filter(|c| applies(c))
            .filter_map(|&(idx, cost)| state.buckets[idx].map(|b| b.time_until(cost)))
            .max()
            .unwrap_or(Duration::ZERO);
        if !wait.is_zero() {
            return Admit::Wait(wait);
        }
        for (idx, cost) in costs {
            if let Some(bucket) = state.buckets[idx].as_mut() {
                bucket.level -= cost;
            }
        }
        Admit::Go
    }

    /// Count a request that waited `held` before it could go.
    pub fn record_throttled(&self, held: Duration) {
        self.throttled_requests.fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(held.as_nanos()).unwrap_or(u64::MAX);
        self.throttled_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Requests that had to wait for a limit.
    pub fn throttled_requests(&self) -> u64 {
        self.throttled_requests.load(Ordering::Relaxed)
    }

    /// Total time requests waited for a limit (summed over requests that waited: one per
    /// queue at a time).
    pub fn throttled_time(&self) -> Duration {
        Duration::from_nanos(self.throttled_ns.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
#[path = "qos_tests.rs"]
mod tests;
