//! How long a queue busy-polls before it sleeps: a window that follows the load.
//!
//! A fixed window is wrong on one machine or another: it spins for nothing when requests are
//! far apart and takes the CPU a slow backend completion needs. Like QEMU's AioContext, the
//! window grows while the driver's next request keeps arriving soon after the queue went to
//! sleep (polling would have caught it without the wake-up), and shrinks when the queue sleeps
//! longer than the largest window (polling could not have helped). The service never polls
//! while the only thing pending is backend I/O with a completion fd: it sleeps on that fd.

use std::time::{Duration, Instant};

/// The first window after polling turned out to be worth it.
const START: Duration = Duration::from_micros(4);

/// The adaptive busy-poll window of one queue.
#[derive(Debug, Clone)]
pub struct AdaptivePoll {
    window: Duration,
    max: Duration,
    asleep_since: Option<Instant>,
}

impl AdaptivePoll {
    /// A window that adapts between zero and `max` (zero: never poll).
    pub fn new(max: Duration) -> Self {
        Self {
            window: Duration::ZERO,
            max,
            asleep_since: None,
        }
    }

    /// The largest window.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// Change the largest window (the current one is clamped to it).
    pub fn set_max(&mut self, max: Duration) {
        self.max = max;
        self.window = self.window.min(max);
    }

    /// How long to poll now, after the last request.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The queue goes to sleep waiting for the driver (nothing in flight).
    pub fn sleeping(&mut self) {
        self.asleep_since = Some(Instant::now());
    }

    /// The queue sleeps on something else (backend I/O in flight): the next wake-up says
    /// nothing about the driver's pace.
    pub fn not_measuring(&mut self) {
        self.asleep_since = None;
    }

    /// The driver woke the queue: adapt the window to how long it slept.
    pub fn woken(&mut self) {
        let Some(since) = self.asleep_since.take() else {
            return;
        };
        self.adapt(since.elapsed());
    }

    fn adapt(&mut self, slept: Duration) {
        if self.max.is_zero() {
            return;
        }
        if slept > self.max {
            // Polling for the largest window would not have caught it.
            self.window /= 2;
            if self.window < START {
                self.window = Duration::ZERO;
            }
        } else if slept > self.window {
            // A longer window would have caught it without a wake-up.
            self.window = if self.window.is_zero() {
                START
            } else {
                self.window * 2
            }
            .min(self.max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_while_requests_come_soon_and_shrinks_to_zero_when_they_do_not() {
        let mut p = AdaptivePoll::new(Duration::from_micros(32));
        assert_eq!(p.window(), Duration::ZERO);
        for _ in 0..10 {
            p.adapt(Duration::from_micros(20));
        }
        assert_eq!(
            p.window(),
            Duration::from_micros(32),
            "capped at the maximum"
        );
        p.adapt(Duration::from_micros(10));
        assert_eq!(p.window(), Duration::from_micros(32), "caught: unchanged");
        for _ in 0..4 {
            p.adapt(Duration::from_millis(5));
        }
        assert_eq!(p.window(), Duration::ZERO, "requests far apart: no polling");
    }

    #[test]
    fn a_zero_maximum_never_polls() {
        let mut p = AdaptivePoll::new(Duration::ZERO);
        p.adapt(Duration::from_micros(1));
        assert_eq!(p.window(), Duration::ZERO);
    }

    #[test]
    fn a_wake_up_without_a_measured_sleep_changes_nothing() {
        let mut p = AdaptivePoll::new(Duration::from_micros(32));
        p.not_measuring();
        p.woken();
        assert_eq!(p.window(), Duration::ZERO);
    }
}
