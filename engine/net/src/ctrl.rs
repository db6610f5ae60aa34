//! The control queue (`VIRTIO_NET_F_CTRL_VQ`, the last queue, offered only where the transport
//! allows it: VDUSE refuses it). A chain is a command in device-readable buffers (class,
//! command, data) followed by a one-byte status the device writes (`VIRTIO_NET_OK` or
//! `VIRTIO_NET_ERR`). Handled:
//!
//! - `RX` (promiscuous, all-multicast, ...): acknowledged; a port gets every frame the switch
//!   or the tap gives it, and the guest's stack filters;
//! - `MAC`: `MAC_TABLE_SET` checked and acknowledged (no filtering either), `MAC_ADDR_SET`
//!   changes the address the configuration space shows;
//! - `MQ`: `VQ_PAIRS_SET` (1 to the pairs offered) spreads received frames over that many rx
//!   queues.
//!
//! Anything else, or a command with data of the wrong size, is answered `VIRTIO_NET_ERR`;
//! a chain without a status byte or a command is completed unanswered (used length 0).

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_net as vn;
use virtiod_core::{Chain, GuestMem, Outcome, QueueHandler};
use vm_memory::Bytes;

use crate::frames::locked;
use crate::{Mac, NetBackend};

/// Longest command read (a MAC table of 2 × 4096 addresses fits).
const MAX_COMMAND: usize = 2 + 8 + 2 * 4096 * 6;
const OK: u8 = vn::VIRTIO_NET_OK as u8;
const ERR: u8 = vn::VIRTIO_NET_ERR as u8;

/// The handler of the control queue.
pub struct CtrlQueue {
    backend: Arc<dyn NetBackend>,
    /// Queue pairs offered (the most `VQ_PAIRS_SET` may ask).
    max_pairs: u16,
    /// The device's MAC address, as the configuration space shows it.
    mac: Arc<Mutex<Mac>>,
    /// The command being read (reused).
    buf: Vec<u8>,
}

impl CtrlQueue {
    /// A control queue for a device with `max_pairs` queue pairs on `backend`, whose
    /// address `MAC_ADDR_SET` changes in `mac`.
    pub fn new(backend: Arc<dyn NetBackend>, max_pairs: u16, mac: Arc<Mutex<Mac>>) -> Self {
        Self {
            backend,
            max_pairs,
            mac,
            buf: Vec::new(),
        }
    }

    /// Execute the command in `self.buf` (class, command, data): the status to write.
    fn execute(&self) -> u8 {
        let (class, cmd, data) = match self.buf.as_slice() {
            [class, cmd, data @ ..] => (u32::from(*class), u32::from(*cmd), data),
            _ => return ERR,
        };
        match (class, cmd) {
            (vn::VIRTIO_NET_CTRL_RX, 0..=5) if data.len() == 1 => OK,
            (vn::VIRTIO_NET_CTRL_MAC, vn::VIRTIO_NET_CTRL_MAC_TABLE_SET) => {
                if mac_tables_ok(data) {
                    OK
                } else {
                    ERR
                }
            }
            (vn::VIRTIO_NET_CTRL_MAC, vn::VIRTIO_NET_CTRL_MAC_ADDR_SET) => {
                match <Mac>::try_from(data) {
                    Ok(mac) if mac[0] & 1 == 0 => {
                        *locked(&self.mac) = mac;
                        OK
                    }
                    _ => ERR,
                }
            }
            (vn::VIRTIO_NET_CTRL_MQ, vn::VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) => {
                let pairs = match <[u8; 2]>::try_from(data) {
                    Ok(le) => u16::from_le_bytes(le),
                    Err(_) => return ERR,
                };
                if pairs == 0 || pairs > self.max_pairs {
                    return ERR;
                }
                self.backend.set_queue_pairs(pairs);
                tracing::debug!(pairs, "the driver uses this many queue pairs");
                OK
            }
            _ => ERR,
        }
    }
}

/// `MAC_TABLE_SET` data: two tables (unicast, multicast), each a little-endian u32 count and
/// that many addresses, nothing after.
fn mac_tables_ok(mut data: &[u8]) -> bool {
    for _ in 0..2 {
        let Some((count, rest)) = data.split_first_chunk::<4>() else {
            return false;
        };
        let len = (u32::from_le_bytes(*count) as usize).saturating_mul(6);
        let Some(rest) = rest.get(len..) else {
            return false;
        };
        data = rest;
    }
    data.is_empty()
}

impl QueueHandler for CtrlQueue {
    /// A new negotiation (device reset): one queue pair until the driver says otherwise.
    fn driver_features(&mut self, _acked: u64) {
        self.backend.set_queue_pairs(1);
    }

    fn start(&mut self, chain: &Chain, mem: &Arc<GuestMem>) -> Outcome {
        let descs = chain.descs();
        let readable = descs.iter().take_while(|d| !d.writable).count();
        let status = descs[readable..].first();
        let len: u64 = descs[..readable].iter().map(|d| u64::from(d.len)).sum();
        let refused = if chain.faults_in(mem.as_ref()) {
            Some("not terminated or outside the driver's memory")
        } else if status.is_none() || descs[readable..].iter().any(|d| !d.writable) {
            Some("no status byte after the command")
        } else if !(2..=MAX_COMMAND as u64).contains(&len) {
            Some("a command shorter than its class and code, or too long")
        } else {
            None
        };
        let (Some(status), None) = (status, refused) else {
            tracing::debug!(
                head = chain.head(),
                why = refused,
                "refusing a control chain"
            );
            return Outcome::Done { used_len: 0 };
        };
        self.buf.resize(len as usize, 0);
        let mut at = 0;
        for d in &descs[..readable] {
            let n = d.len as usize;
            if mem.read_slice(&mut self.buf[at..at + n], d.addr).is_err() {
                return Outcome::Done { used_len: 0 }; // checked above: cannot happen
            }
            at += n;
        }
        let answer = self.execute();
        if answer == ERR {
            tracing::debug!(
                class = self.buf[0],
                cmd = self.buf[1],
                "control command refused"
            );
        }
        match mem.write_slice(&[answer], status.addr) {
            Ok(()) => Outcome::Done { used_len: 1 },
            Err(_) => Outcome::Done { used_len: 0 },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{chain, get, mem, put, CANARY};
    use crate::Switch;

    fn run(q: &mut CtrlQueue, m: &Arc<GuestMem>, command: &[u8]) -> (Outcome, u8) {
        put(m, 0x1000, command);
        put(m, 0x2000, &[CANARY]);
        let c = chain(&[(0x1000, command.len() as u32, false), (0x2000, 1, true)]);
        let out = q.start(&c, m);
        (out, get(m, 0x2000, 1)[0])
    }

    #[test]
    fn commands_are_answered_and_take_effect() {
        let m = Arc::new(mem());
        let port = Switch::new("ctrl").port_with_pairs(4).unwrap();
        let mac = Arc::new(Mutex::new([0x52, 0x54, 0, 0, 0, 1]));
        let mut q = CtrlQueue::new(port.clone(), 4, mac.clone());
        let done = Outcome::Done { used_len: 1 };
        let table = [&2u32.to_le_bytes()[..], &[0x52; 12], &0u32.to_le_bytes()].concat();
        let cases: [(&[u8], u8); 12] = [
            (&[0, 0, 1], OK),           // promiscuous on
            (&[0, 5, 0], OK),           // broadcast off
            (&[0, 6, 0], ERR),          // unknown rx command
            (&[0, 0], ERR),             // no data
            (&[1, 0, 0, 0, 0, 0], ERR), // a cut table
            (&[&[1, 0][..], &table].concat(), OK),
            (&[1, 1, 2, 0x54, 0, 0, 0, 2], OK),
            (&[1, 1, 3, 0x54, 0, 0, 0, 2], ERR), // multicast address
            (&[4, 0, 2, 0], OK),
            (&[4, 0, 5, 0], ERR), // more pairs than offered
            (&[4, 0, 0, 0], ERR),
            (&[2, 0, 1, 0], ERR), // VLAN: not offered
        ];
        for (i, (command, want)) in cases.iter().enumerate() {
            assert_eq!(run(&mut q, &m, command), (done, *want), "case {i}");
        }
        assert_eq!(*locked(&mac), [2, 0x54, 0, 0, 0, 2]);
        // Two pairs in use: frames of many flows reach both rx queues.
        let sender = port.switch().port().unwrap();
        for sport in 0..32u16 {
            let mut f = vec![0; crate::NET_HDR_LEN];
            f.extend_from_slice(&[0xff; 6]);
            f.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 9, 0x08, 0x00, 0x45, 0, 0, 40]);
            f.extend_from_slice(&[0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
            f.extend_from_slice(&sport.to_be_bytes());
            f.extend_from_slice(&[0; 6]);
            sender.transmit(&f);
        }
        let mut got = Vec::new();
        let mut per_pair = [0; 4];
        for (pair, n) in per_pair.iter_mut().enumerate() {
            while port.receive(pair as u16, &mut got) {
                *n += 1;
            }
        }
        assert!(
            per_pair[0] > 0 && per_pair[1] > 0 && per_pair[2..] == [0, 0],
            "{per_pair:?}"
        );
        // A new negotiation goes back to one pair.
        q.driver_features(0);
        for _ in 0..4 {
            sender.transmit(&[&[0; 12][..], &[0xff; 6], &[0x52, 0x54, 0, 0, 0, 9, 8, 6]].concat());
        }
        assert!(!port.receive(1, &mut got));
    }

    #[test]
    fn malformed_chains_are_completed_unanswered() {
        let m = Arc::new(mem());
        let port = Switch::new("ctrl2").port().unwrap();
        let mut q = CtrlQueue::new(port, 1, Arc::new(Mutex::new([0x52, 0, 0, 0, 0, 1])));
        let unanswered = Outcome::Done { used_len: 0 };
        let cases = [
            chain(&[(0x1000, 3, false)]),                    // no status
            chain(&[(0x1000, 1, false), (0x2000, 1, true)]), // no command code
            chain(&[(0x2000, 1, true), (0x1000, 3, false)]), // status first
            chain(&[(0x1000, 3, false), (0x2000, 1, true), (0x3000, 2, false)]),
            chain(&[(0x1000, 3, false), (u64::MAX - 4, 1, true)]),
            chain(&[(0x1000, u32::MAX, false), (0x2000, 1, true)]),
        ];
        put(&m, 0x2000, &[CANARY]);
        for (i, c) in cases.iter().enumerate() {
            assert_eq!(q.start(c, &m), unanswered, "case {i}");
            assert_eq!(get(&m, 0x2000, 1), [CANARY], "case {i}: nothing written");
        }
    }
}
