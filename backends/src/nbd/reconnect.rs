//! Reconnecting a queue's lost connection: hold the pending requests, connect again with
//! backoff, check the export, re-send them; past the timeout, fail them with EIO.

use std::io::Write;
use std::time::{Duration, Instant};

use super::{encode, Link, Shared, Stream, BACKOFF_MAX, BACKOFF_MIN};
use crate::Completion;

impl Shared {
    /// The connection dropped: keep the requests for the reconnect, or fail them at once
    /// when the timeout is zero.
    pub(super) fn on_lost(&self, why: &str) {
        let mut st = self.lock();
        st.drop_parts();
        if self.reconnect_timeout.is_zero() {
            st.link = Link::Failed;
            let failed = st.fail_pending();
            drop(st);
            tracing::error!(export = %self.name, failed, "NBD connection lost ({why}): requests fail with EIO until it is back (reconnect=0)");
        } else {
            st.link = Link::Reconnecting;
            let held = st.requests.len();
            drop(st);
            tracing::warn!(export = %self.name, held, "NBD connection lost ({why}): requests wait for up to {}s while reconnecting", self.reconnect_timeout.as_secs());
        }
        self.signal();
    }

    /// The timeout expired (or the export changed): fail what waits, and what comes next.
    fn give_up(&self, why: &str) {
        let mut st = self.lock();
        if st.link != Link::Reconnecting {
            return;
        }
        st.link = Link::Failed;
        let failed = st.fail_pending();
        drop(st);
        tracing::error!(export = %self.name, failed, "{why}: pending requests fail with EIO, and new ones until it is back");
        self.signal();
    }

    /// Connect again until it works (a new reading stream) or the queue closes (`None`).
    pub(super) fn reconnect(&self) -> Option<Stream> {
        let lost_at = Instant::now();
        let deadline = lost_at + self.reconnect_timeout;
        let mut delay = BACKOFF_MIN;
        let mut size_logged = false;
        loop {
            if self.closing() {
                return None;
            }
            match crate::nbd::connect(&self.addr) {
                Ok((_, info)) if info.size != self.info.size => {
                    if !size_logged {
                        size_logged = true;
                        tracing::error!(export = %self.name, "NBD export is back with size {} instead of {}: not using it", info.size, self.info.size);
                    }
                    self.give_up("the NBD export changed size");
                }
                Ok((stream, _)) => {
                    if let Some(reading) = self.install(stream, lost_at) {
                        return Some(reading);
                    }
                }
                Err(e) => tracing::debug!(export = %self.name, "NBD reconnect failed: {e}"),
            }
            let now = Instant::now();
            if now >= deadline {
                self.give_up(&format!(
                    "NBD server not back after {}s",
                    self.reconnect_timeout.as_secs()
                ));
            }
            let pause = if now < deadline {
                delay.min(deadline - now)
            } else {
                delay
            };
            self.pause(pause);
            delay = (delay * 2).min(BACKOFF_MAX);
        }
    }

    /// Sleep `d`, or less when the queue closes.
    fn pause(&self, d: Duration) {
        let until = Instant::now() + d;
        let mut st = self.lock();
        loop {
            let now = Instant::now();
            if self.closing() || now >= until {
                return;
            }
            st = self
                .cond
                .wait_timeout(st, until - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Use the new connection `stream`: re-send every pending request on it. Returns the
    /// reading side, or `None` when the queue closes or the socket cannot be cloned.
    fn install(&self, stream: Stream, lost_at: Instant) -> Option<Stream> {
        let reading = match stream.try_clone() {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(export = %self.name, "NBD reconnect: cannot clone the socket: {e}");
                return None;
            }
        };
        let mut writer = self.lock_writer();
        let mut out = Vec::new();
        let mut st = self.lock();
        if self.closing() {
            return None;
        }
        let was_failed = st.link == Link::Failed;
        st.link = Link::Up;
        st.generation += 1;
        st.drop_parts();
        let mut ids: Vec<u64> = st.requests.keys().copied().collect();
        ids.sort_unstable(); // submission order
        let state = &mut *st;
        let mut resent = 0usize;
        for id in ids {
            let p = state.requests.get_mut(&id).expect("listed");
            match encode(
                &mut out,
                &p.req,
                (p.cmd, p.flags),
                id,
                self.max_len,
                &self.next_cookie,
            ) {
                Ok(parts) => {
                    p.parts_left = parts.len();
                    state.parts.extend(parts);
                    resent += 1;
                }
                Err(errno) => {
                    let p = state.requests.remove(&id).expect("listed");
                    state.done.push(Completion::new(p.tag, Err(errno), p.req));
                }
            }
        }
        drop(st);
        *writer = stream;
        if let Err(e) = writer.write_all(&out) {
            tracing::debug!(export = %self.name, "NBD write failed: {e}");
            writer.shutdown();
        }
        drop(writer);
        let after = lost_at.elapsed();
        if was_failed {
            tracing::info!(export = %self.name, "NBD connection back after {after:.1?} (requests failed with EIO meanwhile)");
        } else {
            tracing::info!(export = %self.name, resent, "NBD connection back after {after:.1?}: re-sent {resent} requests");
        }
        self.signal();
        Some(reading)
    }
}
