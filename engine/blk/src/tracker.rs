//! Hooks that let a transport keep an in-flight log, so that a restarted daemon can complete
//! every request that was in flight when the previous one died.

/// Told about every request the worker takes off the avail ring and every used-ring entry it
/// publishes. Implementations write to memory that survives the process (e.g. a MAP_SHARED
/// file); the order of calls is the order of the ring operations.
pub trait InflightTracker: Send {
    /// `head` was taken off the avail ring; the ring's next avail index is now `next_avail`.
    /// Called before the request starts executing.
    fn popped(&mut self, head: u16, next_avail: u16);
    /// The used entry for `head` is about to be published (called just before the ring is
    /// written). The default does nothing; vhost-user's in-flight region records the head as
    /// `last_batch_head` here.
    fn completing(&mut self, _head: u16) {}
    /// The used entry for `head` was published; the used index is now `next_used`.
    fn used(&mut self, head: u16, next_used: u16);
}
