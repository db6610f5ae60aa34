//! The receive queue: each chain is a receive buffer (device-writable descriptors). The
//! handler keeps the buffers it is given ([`Outcome::Started`]); when the backend has frames
//! for this port, [`RxQueue`] writes a `virtio_net_hdr_v1` and the frame into them and
//! reports them from `reap`. With MRG_RXBUF a frame spans as many buffers as it needs
//! (`num_buffers` says how many, their used entries are consecutive); without, a frame
//! that does not fit one buffer is dropped and counted.
//!
//! The queue thread sleeps on the backend's rx eventfd ([`NetBackend::rx_event`]), which
//! the backend signals only while this handler holds buffers ([`NetBackend::set_rx_ready`]).

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use virtiod_core::{Chain, ChainDesc, Completed, GuestMem, HandlerError, Outcome, QueueHandler};
use vm_memory::Bytes;

use crate::{NetBackend, PortStats, NET_HDR_LEN};

/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_AT: usize = 10;

/// A receive buffer the driver gave and the device has not used yet.
struct RxBuffer {
    head: u16,
    descs: Vec<ChainDesc>,
    /// Bytes the buffer holds (sum of its descriptors).
    capacity: u64,
    /// The driver memory the buffer was given in.
    mem: Arc<GuestMem>,
}

/// What became of the frame in hand.
enum Placed {
    /// Written; its buffers are in `done`.
    Written,
    /// More receive buffers are needed (MRG_RXBUF): keep the frame until they come.
    NeedBuffers,
    /// It can never fit: dropped and counted.
    Dropped,
}

/// The handler of the receive queue (queue 0).
pub struct RxQueue {
    backend: Arc<dyn NetBackend>,
    /// The queue pair this rx queue belongs to.
    pair: u16,
    mergeable: bool,
    /// Most buffers the driver can give at once (its queue size).
    max_buffers: usize,
    held: VecDeque<RxBuffer>,
    /// Descriptor vectors of used buffers, reused.
    spare: Vec<Vec<ChainDesc>>,
    /// Used entries waiting for `reap`.
    done: Vec<Completed>,
    /// The frame (virtio-net header and packet) taken from the backend and not yet written
    /// (`has_frame`).
    frame: Vec<u8>,
    has_frame: bool,
}

impl RxQueue {
    /// A handler receiving frames from `backend` for queue pair 0; `mergeable`: a frame may
    /// span several buffers (MRG_RXBUF); `max_buffers`: the queue size.
    pub fn new(backend: Arc<dyn NetBackend>, mergeable: bool, max_buffers: usize) -> Self {
        Self::for_pair(backend, 0, mergeable, max_buffers)
    }

    /// As [`Self::new`], the rx queue of queue pair `pair`.
    pub fn for_pair(
        backend: Arc<dyn NetBackend>,
        pair: u16,
        mergeable: bool,
        max_buffers: usize,
    ) -> Self {
        Self {
            backend,
            pair,
            mergeable,
            max_buffers: max_buffers.max(1),
            held: VecDeque::new(),
            spare: Vec::new(),
            done: Vec::new(),
            frame: Vec::new(),
            has_frame: false,
        }
    }

    /// Receive buffers held.
    pub fn buffers(&self) -> usize {
        self.held.len()
    }

    /// Write frames waiting in the backend into the buffers held, while both last.
    fn deliver(&mut self) {
        while !self.held.is_empty() {
            if !self.has_frame {
                if !self.backend.receive(self.pair, &mut self.frame) {
                    break;
                }
                self.has_frame = true;
            }
            match self.place() {
                Placed::Written => {
                    let stats = self.backend.stats();
                    let len = self.frame.len().saturating_sub(NET_HDR_LEN);
                    PortStats::frame(&stats.rx_packets, &stats.rx_bytes, len);
                    self.has_frame = false;
                }
                Placed::Dropped => {
                    PortStats::bump(&self.backend.stats().rx_too_big);
                    tracing::debug!(len = self.frame.len(), "frame too big for the rx buffers");
                    self.has_frame = false;
                }
                Placed::NeedBuffers => break,
            }
        }
    }

    /// Write the frame in hand (its header's `num_buffers` set) into the first buffer(s)
    /// held.
    fn place(&mut self) -> Placed {
        if self.frame.len() < NET_HDR_LEN {
            return Placed::Dropped; // backends queue header and frame: cannot happen
        }
        let need = self.frame.len() as u64;
        let count = if self.mergeable {
            let mut sum = 0;
            match self.held.iter().position(|b| {
                sum += b.capacity;
                sum >= need
            }) {
                Some(last) => last + 1,
                None if self.held.len() >= self.max_buffers => return Placed::Dropped,
                None => return Placed::NeedBuffers,
            }
        } else if self.held[0].capacity >= need {
            1
        } else {
            return Placed::Dropped;
        };
        // count <= held <= max_buffers (can_start), a queue size: at most 32768.
        let num_buffers = u16::try_from(count).unwrap_or(u16::MAX);
        self.frame[NUM_BUFFERS_AT..NET_HDR_LEN].copy_from_slice(&num_buffers.to_le_bytes());
        let mut at = 0;
        for buf in self.held.drain(..count) {
            let used = write_buffer(&buf, &self.frame[at..]);
            at += used;
            self.done.push(Completed {
                head: buf.head,
                used_len: used as u32, // at most the buffer's capacity, checked to fit u32 sums
            });
            self.spare.push(buf.descs);
        }
        Placed::Written
    }

    /// Give every buffer back unused (used length 0): the queue is being drained.
    fn release_all(&mut self) {
        for buf in self.held.drain(..) {
            self.done.push(Completed {
                head: buf.head,
                used_len: 0,
            });
            self.spare.push(buf.descs);
        }
        self.backend.set_rx_ready(self.pair, false);
        let _ = self.backend.rx_event(self.pair).read();
    }
}

/// Write `bytes` from the start of `buf` (as much as fits); returns the bytes written.
fn write_buffer(buf: &RxBuffer, bytes: &[u8]) -> usize {
    let mut at = 0;
    for d in &buf.descs {
        if at == bytes.len() {
            break;
        }
        let n = (d.len as usize).min(bytes.len() - at);
        if let Err(err) = buf.mem.write_slice(&bytes[at..at + n], d.addr) {
            // Checked at start; the memory the buffer was given in cannot shrink.
            tracing::warn!(head = buf.head, %err, "rx buffer no longer writable");
            break;
        }
        at += n;
    }
    at
}

impl QueueHandler for RxQueue {
    fn driver_features(&mut self, acked: u64) {
        self.mergeable = acked & crate::F_MRG_RXBUF != 0;
        self.backend.set_guest_features(acked);
    }

    /// At most a queue's worth of buffers is held (a driver that repeats heads on the avail
    /// ring cannot make the device keep more).
    fn can_start(&self) -> bool {
        self.held.len() < self.max_buffers
    }

    /// Keep the receive buffer for the next frame; refuse (used length 0, counted) a chain
    /// that is not only device-writable buffers in the driver's memory, at least a header
    /// long.
    fn start(&mut self, chain: &Chain, mem: &Arc<GuestMem>) -> Outcome {
        let capacity: u64 = chain.descs().iter().map(|d| u64::from(d.len)).sum();
        let refused = if chain.faults_in(mem.as_ref()) {
            Some("not terminated or outside the driver's memory")
        } else if chain.descs().iter().any(|d| !d.writable) {
            Some("a device-readable descriptor")
        } else if capacity < NET_HDR_LEN as u64 || capacity > u64::from(u32::MAX) {
            Some("smaller than the virtio-net header, or above 4 GiB")
        } else {
            None
        };
        if let Some(why) = refused {
            PortStats::bump(&self.backend.stats().rx_malformed);
            tracing::debug!(head = chain.head(), why, "refusing an rx buffer");
            return Outcome::Done { used_len: 0 };
        }
        let mut descs = self.spare.pop().unwrap_or_default();
        descs.clear();
        descs.extend_from_slice(chain.descs());
        self.held.push_back(RxBuffer {
            head: chain.head(),
            descs,
            capacity,
            mem: mem.clone(),
        });
        Outcome::Started
    }

    /// After a batch of new buffers: tell the backend to wake this queue for frames (at once
    /// if frames wait), and wake it ourselves if a frame in hand waited for buffers.
    fn submit(&mut self) -> Result<(), HandlerError> {
        if self.held.is_empty() {
            return Ok(());
        }
        if self.has_frame {
            self.backend
                .rx_event(self.pair)
                .write(1)
                .map_err(|e| HandlerError(format!("waking the rx queue: {e}")))?;
        }
        self.backend.set_rx_ready(self.pair, true);
        Ok(())
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.backend.rx_event(self.pair).as_raw_fd())
    }

    fn ack_completion_event(&mut self) {
        let _ = self.backend.rx_event(self.pair).read();
    }

    fn reap(&mut self, out: &mut Vec<Completed>) {
        self.deliver();
        if self.held.is_empty() {
            self.backend.set_rx_ready(self.pair, false);
        }
        out.append(&mut self.done);
    }

    /// Only called to drain the queue: the buffers held go back unused.
    fn wait(&mut self) -> Result<(), HandlerError> {
        self.release_all();
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.held.len() + self.done.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{chain_at, get, mem, CANARY, MEM_LEN};
    use crate::{Switch, SwitchPort};

    /// A zeroed virtio-net header and an Ethernet frame of `len` bytes.
    fn frame(len: usize, tag: u8) -> Vec<u8> {
        let mut f = vec![0; NET_HDR_LEN];
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 0xa]);
        f.extend((12..len).map(|i| (i as u8) ^ tag));
        f
    }

    fn header(num_buffers: u16) -> Vec<u8> {
        let mut h = vec![0; NET_HDR_LEN];
        h[10..12].copy_from_slice(&num_buffers.to_le_bytes());
        h
    }

    /// A switch with the port under test (`rx`) and a sender.
    fn ports() -> (Arc<SwitchPort>, Arc<SwitchPort>) {
        let sw = Switch::new("rx");
        (sw.port().unwrap(), sw.port().unwrap())
    }

    /// Everything outside `allowed` is still canary.
    fn untouched_outside(m: &GuestMem, allowed: &[(u64, usize)]) {
        let mut all = get(m, 0, MEM_LEN);
        for &(addr, len) in allowed {
            all[addr as usize..addr as usize + len].fill(CANARY);
        }
        let stray = all.iter().position(|&b| b != CANARY);
        assert_eq!(stray, None, "a byte written outside the buffers");
    }

    #[test]
    fn a_frame_spans_several_small_buffers_with_mrg_rxbuf() {
        let m = Arc::new(mem());
        let (port, sender) = ports();
        let mut q = RxQueue::new(port.clone(), true, 256);
        // Three buffers of 40, 24 + 16 (two descriptors) and 64 bytes.
        let bufs = [
            chain_at(0, &[(0x1000, 40, true)]),
            chain_at(1, &[(0x2000, 24, true), (0x2100, 16, true)]),
            chain_at(3, &[(0x3000, 64, true)]),
        ];
        for b in &bufs {
            assert_eq!(q.start(b, &m), Outcome::Started);
        }
        q.submit().unwrap();
        let f = frame(90, 1); // 102 bytes with the header: 40 + 40 + 22
        sender.transmit(&f);
        assert_eq!(port.rx_event(0).read().unwrap(), 1, "the queue is woken");
        let mut out = Vec::new();
        q.reap(&mut out);
        let want = [(0, 40), (1, 40), (3, 22)].map(|(head, used_len)| Completed { head, used_len });
        assert_eq!(out, want);
        let mut stream = header(3);
        stream.extend_from_slice(&f[NET_HDR_LEN..]);
        assert_eq!(get(&m, 0x1000, 40), stream[..40]);
        assert_eq!(get(&m, 0x2000, 24), stream[40..64]);
        assert_eq!(get(&m, 0x2100, 16), stream[64..80]);
        assert_eq!(get(&m, 0x3000, 22), stream[80..]);
        untouched_outside(
            &m,
            &[(0x1000, 40), (0x2000, 24), (0x2100, 16), (0x3000, 22)],
        );
        assert_eq!(
            (
                port.stats().snapshot().rx_packets,
                port.stats().snapshot().rx_bytes
            ),
            (1, 90)
        );
        assert_eq!(q.in_flight(), 0);
    }

    #[test]
    fn a_frame_in_one_buffer_has_num_buffers_1_and_waits_for_more_buffers_when_short() {
        let m = Arc::new(mem());
        let (port, sender) = ports();
        let mut q = RxQueue::new(port.clone(), true, 256);
        let mut out = Vec::new();
        // No buffers yet: the frame waits in the port, and nobody is woken.
        let f = frame(60, 2);
        sender.transmit(&f);
        assert!(port.rx_event(0).read().is_err());
        // A buffer too small for the whole frame: the frame is taken and waits for more.
        q.start(&chain_at(5, &[(0x1000, 32, true)]), &m);
        q.submit().unwrap();
        q.ack_completion_event();
        q.reap(&mut out);
        assert!(out.is_empty() && q.buffers() == 1);
        q.start(&chain_at(6, &[(0x2000, 1500, true)]), &m);
        q.submit().unwrap();
        assert!(
            port.rx_event(0).read().is_ok(),
            "the frame in hand wakes the queue"
        );
        q.reap(&mut out);
        assert_eq!(
            out,
            [
                Completed {
                    head: 5,
                    used_len: 32
                },
                Completed {
                    head: 6,
                    used_len: 40
                }
            ]
        );
        // The next frame fits one buffer: num_buffers = 1.
        q.start(&chain_at(7, &[(0x4000, 1500, true)]), &m);
        q.submit().unwrap();
        sender.transmit(&f);
        out.clear();
        q.reap(&mut out);
        assert_eq!(
            out,
            [Completed {
                head: 7,
                used_len: 72
            }]
        );
        let mut stream = header(1);
        stream.extend_from_slice(&f[NET_HDR_LEN..]);
        assert_eq!(get(&m, 0x4000, 72), stream);
    }

    #[test]
    fn at_most_a_queue_of_buffers_is_held_and_a_frame_larger_than_all_of_them_is_dropped() {
        let m = Arc::new(mem());
        let (port, sender) = ports();
        let mut q = RxQueue::new(port.clone(), true, 2);
        q.start(&chain_at(0, &[(0x1000, 16, true)]), &m);
        assert!(q.can_start());
        q.start(&chain_at(1, &[(0x2000, 16, true)]), &m);
        assert!(!q.can_start(), "a queue's worth of buffers held");
        q.submit().unwrap();
        sender.transmit(&frame(60, 6)); // 72 bytes with the header > 32
        let mut out = Vec::new();
        q.reap(&mut out);
        assert!(
            out.is_empty() && q.buffers() == 2,
            "buffers kept for the next frame"
        );
        assert_eq!(port.stats().snapshot().rx_too_big, 1);
        sender.transmit(&frame(20, 7)); // 32 bytes with the header: both buffers
        q.reap(&mut out);
        assert_eq!(
            out,
            [
                Completed {
                    head: 0,
                    used_len: 16
                },
                Completed {
                    head: 1,
                    used_len: 16
                }
            ]
        );
        assert_eq!(get(&m, 0x1000, 12), header(2));
        untouched_outside(&m, &[(0x1000, 16), (0x2000, 16)]);
    }

    #[test]
    fn without_mrg_rxbuf_a_frame_too_big_for_the_buffer_is_dropped_and_counted() {
        let m = Arc::new(mem());
        let (port, sender) = ports();
        // Created mergeable, as the device does; the driver then declines MRG_RXBUF.
        let mut q = RxQueue::new(port.clone(), true, 256);
        q.driver_features(crate::F_MAC);
        q.start(&chain_at(0, &[(0x1000, 64, true)]), &m);
        q.submit().unwrap();
        sender.transmit(&frame(100, 3));
        sender.transmit(&frame(52, 4)); // exactly 64 with the header
        let mut out = Vec::new();
        q.reap(&mut out);
        assert_eq!(
            out,
            [Completed {
                head: 0,
                used_len: 64
            }]
        );
        let s = port.stats().snapshot();
        assert_eq!((s.rx_too_big, s.rx_packets, s.rx_bytes), (1, 1, 52));
        untouched_outside(&m, &[(0x1000, 64)]);
    }

    #[test]
    fn malformed_buffers_are_refused_untouched_and_draining_gives_buffers_back() {
        let m = Arc::new(mem());
        let (port, sender) = ports();
        let mut q = RxQueue::new(port.clone(), true, 256);
        let bad = [
            chain_at(0, &[(0x1000, 12, false)]),
            chain_at(1, &[(0x1000, 11, true)]),
            chain_at(2, &[(0x1000, 12, false), (0x2000, 64, true)]),
            chain_at(3, &[(MEM_LEN as u64 - 4, 64, true)]),
        ];
        for c in &bad {
            assert_eq!(q.start(c, &m), Outcome::Done { used_len: 0 });
        }
        assert_eq!(port.stats().snapshot().rx_malformed, 4);
        assert!(q.can_start());
        // A chain cut short (NEXT to itself) is refused too.
        let mut cut = Chain::new();
        let looping = virtio_queue::desc::split::Descriptor::new(0x1000, 64, 3, 0);
        cut.collect_descriptors(9, std::iter::once(looping));
        assert_eq!(q.start(&cut, &m), Outcome::Done { used_len: 0 });
        // Draining hands the held buffers back with used length 0, writing nothing.
        q.start(&chain_at(4, &[(0x3000, 64, true)]), &m);
        q.submit().unwrap();
        assert_eq!(q.in_flight(), 1);
        q.wait().unwrap();
        sender.transmit(&frame(60, 5));
        let mut out = Vec::new();
        q.reap(&mut out);
        assert_eq!(
            out,
            [Completed {
                head: 4,
                used_len: 0
            }]
        );
        assert_eq!(q.in_flight(), 0);
        assert!(
            port.rx_event(0).read().is_err(),
            "not ready after the drain"
        );
        untouched_outside(&m, &[]);
    }
}
