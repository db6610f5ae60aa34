//! A fixed-size log-linear latency histogram (HDR-style): no allocation while recording.
//!
//! Values below 128 ns get one bucket each; above, each power of two is split into 64 buckets,
//! so any recorded value is known to within 1/64 (≈ 1.6 %).

/// Values below this are exact.
const LINEAR: u64 = 128;
/// Buckets per power of two above `LINEAR` (6 bits of mantissa).
const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;
/// Enough for values up to 2^47 ns (≈ 39 hours).
const BUCKETS: usize = LINEAR as usize + 41 * SUB as usize;

/// Latency histogram in nanoseconds.
pub struct Histogram {
    counts: Box<[u64; BUCKETS]>,
    total: u64,
    sum_ns: u128,
    max_ns: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    /// An empty histogram (the only allocation it makes).
    pub fn new() -> Self {
        Self {
            counts: Box::new([0; BUCKETS]),
            total: 0,
            sum_ns: 0,
            max_ns: 0,
        }
    }

    fn index(ns: u64) -> usize {
        if ns < LINEAR {
            return ns as usize;
        }
        let exp = 63 - ns.leading_zeros(); // >= 7
        let shift = exp - SUB_BITS;
        let mantissa = (ns >> shift) - SUB; // 0..SUB
        let idx = LINEAR as usize + (exp - 7) as usize * SUB as usize + mantissa as usize;
        idx.min(BUCKETS - 1)
    }

    /// The lowest and highest value that land in bucket `idx`.
    fn bounds(idx: usize) -> (u64, u64) {
        if idx < LINEAR as usize {
            return (idx as u64, idx as u64);
        }
        let rel = idx - LINEAR as usize;
        let exp = 7 + (rel / SUB as usize) as u32;
        let mantissa = SUB + (rel % SUB as usize) as u64;
        let shift = exp - SUB_BITS;
        let low = mantissa << shift;
        (low, low + (1u64 << shift) - 1)
    }

    /// Record one latency.
    #[inline]
    pub fn record(&mut self, ns: u64) {
        self.counts[Self::index(ns)] += 1;
        self.total += 1;
        self.sum_ns += ns as u128;
        self.max_ns = self.max_ns.max(ns);
    }

    /// Number of recorded values.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// Mean in nanoseconds (exact).
    pub fn mean_ns(&self) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        self.sum_ns as f64 / self.total as f64
    }

    /// The value at quantile `q` (0..=1), as the middle of its bucket, in nanoseconds.
    pub fn quantile_ns(&self, q: f64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (idx, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let (low, high) = Self::bounds(idx);
                let mid = (low + high) as f64 / 2.0;
                return mid.min(self.max_ns as f64);
            }
        }
        self.max_ns as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_cover_their_values() {
        let mut expect_low = 0;
        for idx in 0..BUCKETS {
            let (low, high) = Histogram::bounds(idx);
            assert_eq!(low, expect_low, "bucket {idx}");
            assert!(high >= low);
            assert_eq!(Histogram::index(low), idx);
            assert_eq!(Histogram::index(high), idx);
            expect_low = high + 1;
        }
    }

    #[test]
    fn quantiles_are_within_bucket_precision() {
        let mut h = Histogram::new();
        for ns in 1..=100_000u64 {
            h.record(ns);
        }
        assert_eq!(h.count(), 100_000);
        assert!((h.mean_ns() - 50_000.5).abs() < 1e-6);
        let p50 = h.quantile_ns(0.5);
        let p99 = h.quantile_ns(0.99);
        assert!((p50 - 50_000.0).abs() / 50_000.0 < 1.0 / 64.0, "p50 {p50}");
        assert!((p99 - 99_000.0).abs() / 99_000.0 < 1.0 / 64.0, "p99 {p99}");
        assert!(h.quantile_ns(1.0) <= 100_000.0);
    }

    #[test]
    fn small_values_are_exact() {
        let mut h = Histogram::new();
        h.record(5);
        h.record(5);
        h.record(90);
        assert_eq!(h.quantile_ns(0.5), 5.0);
        assert_eq!(h.quantile_ns(1.0), 90.0);
    }

    #[test]
    fn huge_values_saturate() {
        let mut h = Histogram::new();
        h.record(u64::MAX);
        assert_eq!(h.count(), 1);
    }
}
