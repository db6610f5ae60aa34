//! `switch:NAME`: an Ethernet switch inside the process. Its ports (one per virtio-net
//! device) exchange frames by learned source MAC address; broadcast, multicast and unknown
//! unicast frames are flooded to every other port, and no frame goes back to its sender.
//!
//! Frames carry their virtio-net header: a port whose driver takes the offloads a frame uses
//! gets it as it is (a 64 KiB TCP GSO frame stays one frame), the others get it finished in
//! software (checksum completed, TCP segments cut) when it is queued for them.
//!
//! Each port keeps a bounded queue of frames waiting for receive buffers; beyond
//! [`crate::PORT_QUEUE_FRAMES`] frames, new ones are dropped and counted, so a slow port never
//! blocks the others.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::backend::{NetBackend, PortStats};
use crate::frames::locked;
use crate::steer::PortQueues;
use crate::{NetError, NET_HDR_LEN};

/// A learned address is forgotten when no frame came from it for this long.
pub const MAC_AGEING: Duration = Duration::from_secs(300);
/// Most addresses a switch learns (beyond, expired ones are evicted; else none is learned).
pub const MAC_TABLE_SIZE: usize = 4096;

/// A MAC address.
pub type Mac = [u8; 6];

/// Switches of this process by name (`switch:NAME` finds the same one).
static SWITCHES: Mutex<Option<HashMap<String, Weak<Switch>>>> = Mutex::new(None);

/// An in-process Ethernet switch.
#[derive(Debug)]
pub struct Switch {
    name: String,
    inner: Mutex<SwitchInner>,
}

#[derive(Debug, Default)]
struct SwitchInner {
    next_id: u64,
    ports: Vec<(u64, Weak<SwitchPort>)>,
    /// Address → (port id, last seen).
    macs: HashMap<Mac, (u64, Instant)>,
}

impl Switch {
    /// A new switch, not registered by name (tests, or a caller that shares the `Arc`).
    pub fn new(name: &str) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_string(),
            inner: Mutex::new(SwitchInner::default()),
        })
    }

    /// The switch of this process called `name`, created on first use (it lives while one
    /// of its ports or another handle does).
    pub fn named(name: &str) -> Result<Arc<Self>, NetError> {
        if name.is_empty() {
            return Err(NetError::SwitchName(name.to_string()));
        }
        let mut all = locked(&SWITCHES);
        let all = all.get_or_insert_with(HashMap::new);
        all.retain(|_, s| s.strong_count() > 0);
        if let Some(sw) = all.get(name).and_then(Weak::upgrade) {
            return Ok(sw);
        }
        let sw = Self::new(name);
        all.insert(name.to_string(), Arc::downgrade(&sw));
        Ok(sw)
    }

    /// The switch's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A new port on this switch with one queue pair (removed when dropped).
    pub fn port(self: &Arc<Self>) -> Result<Arc<SwitchPort>, NetError> {
        self.port_with_pairs(1)
    }

    /// A new port on this switch for a device with `pairs` queue pairs (1 to
    /// [`crate::MAX_QUEUE_PAIRS`]).
    pub fn port_with_pairs(self: &Arc<Self>, pairs: u16) -> Result<Arc<SwitchPort>, NetError> {
        let rx = PortQueues::new(pairs)?;
        let mut inner = locked(&self.inner);
        let id = inner.next_id;
        inner.next_id += 1;
        let port = Arc::new(SwitchPort {
            id,
            switch: self.clone(),
            rx,
            stats: PortStats::default(),
        });
        inner.ports.push((id, Arc::downgrade(&port)));
        tracing::debug!(switch = %self.name, port = id, "port added");
        Ok(port)
    }

    /// Forward `frame` (virtio-net header and Ethernet frame) sent by port `from`, as of
    /// `now`.
    fn forward(&self, from: u64, frame: &[u8], now: Instant) {
        let Some((dst, src)) = frame.get(NET_HDR_LEN..).and_then(macs) else {
            return;
        };
        let mut inner = locked(&self.inner);
        if !is_multicast(&src) {
            inner.learn(src, from, now);
        }
        let target = if is_multicast(&dst) {
            None
        } else {
            inner
                .macs
                .get(&dst)
                .filter(|(_, seen)| now.duration_since(*seen) < MAC_AGEING)
                .map(|&(port, _)| port)
        };
        match target {
            Some(port) if port == from => {} // its own address: never echoed back
            Some(port) => {
                if let Some(p) = inner.port(port) {
                    p.deliver(frame);
                }
            }
            None => {
                for (id, p) in &inner.ports {
                    if *id != from {
                        if let Some(p) = p.upgrade() {
                            p.deliver(frame);
                        }
                    }
                }
            }
        }
    }

    fn remove(&self, id: u64) {
        let mut inner = locked(&self.inner);
        inner.ports.retain(|(p, _)| *p != id);
        inner.macs.retain(|_, (p, _)| *p != id);
    }
}

impl SwitchInner {
    fn learn(&mut self, mac: Mac, port: u64, now: Instant) {
        if self.macs.len() >= MAC_TABLE_SIZE && !self.macs.contains_key(&mac) {
            self.macs
                .retain(|_, (_, seen)| now.duration_since(*seen) < MAC_AGEING);
            if self.macs.len() >= MAC_TABLE_SIZE {
                return;
            }
        }
        self.macs.insert(mac, (port, now));
    }

    fn port(&self, id: u64) -> Option<Arc<SwitchPort>> {
        self.ports
            .iter()
            .find(|(p, _)| *p == id)
            .and_then(|(_, p)| p.upgrade())
    }
}

/// (destination, source) of an Ethernet frame; None if it is shorter than the two.
fn macs(frame: &[u8]) -> Option<(Mac, Mac)> {
    let dst = frame.get(0..6)?.try_into().ok()?;
    let src = frame.get(6..12)?.try_into().ok()?;
    Some((dst, src))
}

/// Group bit: broadcast and multicast addresses.
fn is_multicast(mac: &Mac) -> bool {
    mac[0] & 1 != 0
}

/// One port of a [`Switch`]: the [`NetBackend`] of one virtio-net device.
#[derive(Debug)]
pub struct SwitchPort {
    id: u64,
    switch: Arc<Switch>,
    rx: PortQueues,
    stats: PortStats,
}

impl SwitchPort {
    /// The switch this port is on.
    pub fn switch(&self) -> &Arc<Switch> {
        &self.switch
    }

    /// Frames waiting for receive buffers.
    pub fn queued(&self) -> usize {
        self.rx.len()
    }

    /// Queue `frame` for this port's driver (dropped and counted when the queue is full).
    fn deliver(&self, frame: &[u8]) {
        self.rx.push(frame, &self.stats);
    }

    /// Forward a frame as sent at `now` (tests of ageing).
    #[cfg(test)]
    fn transmit_at(&self, frame: &[u8], now: Instant) {
        self.switch.forward(self.id, frame, now);
    }
}

impl NetBackend for SwitchPort {
    fn transmit(&self, frame: &[u8]) {
        self.switch.forward(self.id, frame, Instant::now());
    }

    fn receive(&self, pair: u16, frame: &mut Vec<u8>) -> bool {
        self.rx.queue(pair).pop(frame)
    }

    fn rx_event(&self, pair: u16) -> &EventFd {
        self.rx.event(pair)
    }

    fn set_rx_ready(&self, pair: u16, ready: bool) {
        self.rx.queue(pair).set_ready(ready);
    }

    fn queue_pairs(&self) -> u16 {
        self.rx.pairs()
    }

    fn set_queue_pairs(&self, pairs: u16) {
        self.rx.set_active(pairs);
    }

    fn set_guest_features(&self, features: u64) {
        self.rx.set_guest_features(features);
    }

    fn stats(&self) -> &PortStats {
        &self.stats
    }
}

impl Drop for SwitchPort {
    fn drop(&mut self) {
        self.switch.remove(self.id);
        tracing::debug!(switch = %self.switch.name, port = self.id, "port removed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PORT_QUEUE_FRAMES;

    const A: Mac = [0x52, 0x54, 0, 0, 0, 0xa];
    const B: Mac = [0x52, 0x54, 0, 0, 0, 0xb];
    const C: Mac = [0x52, 0x54, 0, 0, 0, 0xc];
    const BROADCAST: Mac = [0xff; 6];

    fn frame(dst: Mac, src: Mac, tag: u8) -> Vec<u8> {
        let mut f = vec![0; NET_HDR_LEN];
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x08, 0x00, tag, tag, tag]);
        f
    }

    fn take_all(p: &SwitchPort) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut f = Vec::new();
        while p.receive(0, &mut f) {
            out.push(f.clone());
        }
        out
    }

    #[test]
    fn floods_unknown_then_forwards_learned_unicast_and_never_echoes() {
        let sw = Switch::new("t1");
        let (a, b, c) = (sw.port().unwrap(), sw.port().unwrap(), sw.port().unwrap());
        // Unknown unicast and broadcast are flooded to every other port.
        a.transmit(&frame(B, A, 1));
        b.transmit(&frame(BROADCAST, B, 2));
        assert_eq!(take_all(&a), [frame(BROADCAST, B, 2)]);
        assert_eq!(take_all(&b), [frame(B, A, 1)]);
        assert_eq!(take_all(&c), [frame(B, A, 1), frame(BROADCAST, B, 2)]);
        // Both learned: unicast goes to one port only.
        c.transmit(&frame(A, C, 3));
        a.transmit(&frame(B, A, 4));
        assert_eq!(take_all(&a), [frame(A, C, 3)]);
        assert_eq!(take_all(&b), [frame(B, A, 4)]);
        assert!(take_all(&c).is_empty());
        // A frame to the sender's own address is not echoed (nor flooded).
        a.transmit(&frame(A, A, 5));
        assert!(take_all(&a).is_empty() && take_all(&b).is_empty() && take_all(&c).is_empty());
        // Multicast is flooded.
        let mcast = [0x01, 0x00, 0x5e, 0, 0, 1];
        b.transmit(&frame(mcast, B, 6));
        assert_eq!(take_all(&a), [frame(mcast, B, 6)]);
        assert_eq!(take_all(&c), [frame(mcast, B, 6)]);
        assert!(take_all(&b).is_empty());
    }

    #[test]
    fn learned_addresses_expire_and_move_and_removed_ports_are_forgotten() {
        let sw = Switch::new("t2");
        let (a, b, c) = (sw.port().unwrap(), sw.port().unwrap(), sw.port().unwrap());
        let t0 = Instant::now();
        b.transmit_at(&frame(BROADCAST, B, 0), t0);
        take_all(&a);
        take_all(&c);
        a.transmit_at(&frame(B, A, 1), t0 + Duration::from_secs(10));
        assert_eq!(take_all(&b).len(), 1);
        assert!(take_all(&c).is_empty(), "learned: not flooded");
        a.transmit_at(&frame(B, A, 2), t0 + MAC_AGEING);
        assert_eq!(take_all(&c).len(), 1, "expired: flooded again");
        take_all(&b);
        // B's address moves to port C.
        c.transmit(&frame(BROADCAST, B, 3));
        a.transmit(&frame(B, A, 4));
        assert_eq!(take_all(&c).len(), 1);
        assert!(take_all(&b).iter().all(|f| f[NET_HDR_LEN + 14] != 4));
        // A removed port gets nothing, and its addresses are forgotten.
        drop(c);
        a.transmit(&frame(B, A, 5));
        assert_eq!(take_all(&b), [frame(B, A, 5)]);
    }

    #[test]
    fn a_full_port_queue_drops_and_counts_without_blocking_the_others() {
        let sw = Switch::new("t3");
        let (a, b, c) = (sw.port().unwrap(), sw.port().unwrap(), sw.port().unwrap());
        for i in 0..PORT_QUEUE_FRAMES + 10 {
            a.transmit(&frame(BROADCAST, A, i as u8));
            take_all(&c); // C keeps up
        }
        assert_eq!(b.queued(), PORT_QUEUE_FRAMES);
        assert_eq!(b.stats().snapshot().rx_queue_full, 10);
        assert_eq!(c.stats().snapshot().rx_queue_full, 0);
        // The first frames are kept, in order.
        let got = take_all(&b);
        assert_eq!(got[0], frame(BROADCAST, A, 0));
        assert_eq!(got.len(), PORT_QUEUE_FRAMES);
    }

    #[test]
    fn the_event_is_signalled_only_while_the_rx_queue_is_ready() {
        let sw = Switch::new("t4");
        let (a, b) = (sw.port().unwrap(), sw.port().unwrap());
        a.transmit(&frame(BROADCAST, A, 1));
        assert!(b.rx_event(0).read().is_err(), "not ready: no wake-up");
        b.set_rx_ready(0, true);
        assert_eq!(
            b.rx_event(0).read().unwrap(),
            1,
            "ready with a frame waiting"
        );
        a.transmit(&frame(BROADCAST, A, 2));
        assert_eq!(b.rx_event(0).read().unwrap(), 1);
        // Runt frames (no Ethernet addresses) are not forwarded.
        a.transmit(&[0xff; NET_HDR_LEN + 11]);
        a.transmit(&[0xff; 5]);
        assert_eq!(take_all(&b).len(), 2);
    }

    #[test]
    fn switches_are_found_by_name() {
        let one = Switch::named("t5-shared").unwrap();
        let two = Switch::named("t5-shared").unwrap();
        assert!(Arc::ptr_eq(&one, &two));
        assert!(!Arc::ptr_eq(&one, &Switch::named("t5-other").unwrap()));
        assert!(Switch::named("").is_err());
    }
}
