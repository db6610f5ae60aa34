//! virtio-net on top of the [`frontend`](crate::frontend): a guest that posts receive buffers,
//! sends frames one readable buffer each, and checks what arrived.
//!
//! Queue 0 is the first receive queue, queue 1 the first transmit queue; frames carry the
//! 12-byte `virtio_net_hdr` of a VERSION_1 device.

use std::path::Path;
use std::time::Duration;

use crate::frontend::{Desc, Driver, Options};

/// The `virtio_net_hdr` length with VERSION_1 (or MRG_RXBUF) negotiated.
pub const NET_HDR_LEN: usize = 12;
/// The first receive queue.
pub const RX: usize = 0;
/// The first transmit queue.
pub const TX: usize = 1;
/// Size of each receive buffer posted by [`NetGuest::connect`].
pub const RX_BUF: u32 = 2048;
/// How many receive buffers [`NetGuest::connect`] posts (heads `0..RX_BUFFERS`).
pub const RX_BUFFERS: u16 = 4;
/// How long [`NetGuest::expect_nothing`] waits before deciding nothing arrives.
pub const SETTLE: Duration = Duration::from_millis(100);

/// An Ethernet address.
pub type Mac = [u8; 6];

/// A guest: its frontend and the receive buffers it posted (by head).
pub struct NetGuest {
    /// The frontend, for checks of the test's own.
    pub d: Driver,
    /// The receive buffers, indexed by head.
    pub rx: Vec<Desc>,
}

impl NetGuest {
    /// Connect with two queues (one pair) and `features`, and post [`RX_BUFFERS`] receive
    /// buffers of [`RX_BUF`] bytes, one descriptor each.
    pub fn connect(socket: &Path, features: u64) -> Self {
        let opts = Options::queues(2).features(features);
        let mut d = Driver::connect_opts(socket, &opts);
        assert_eq!(d.num_queues(), 2);
        let rx: Vec<Desc> = (0..RX_BUFFERS).map(|_| d.writable(RX_BUF)).collect();
        d.write_table_at(RX, 0, &rx);
        d.make_available(RX, &(0..RX_BUFFERS).collect::<Vec<_>>());
        Self { d, rx }
    }

    /// Send `frame` (a zeroed header + the frame, in one readable buffer at `head`) and wait
    /// for its completion: used length 0, nothing written anywhere.
    pub fn send(&mut self, head: u16, frame: &[u8]) {
        let mut bytes = vec![0u8; NET_HDR_LEN];
        bytes.extend_from_slice(frame);
        let buf = self.d.readable(&bytes);
        self.d.write_table_at(TX, head, &[buf]);
        self.d.make_available(TX, &[head]);
        assert_eq!(self.d.wait_used(TX, 1), [(u32::from(head), 0)]);
        self.d.verify("tx", &[]);
    }

    /// Wait for one received frame; check it is `frame` behind a header that says one buffer
    /// and nothing else, and that the device wrote nothing beyond it.
    pub fn expect(&mut self, case: &str, frame: &[u8]) {
        let used = self.d.wait_used(RX, 1);
        let (head, len) = used[0];
        let want_len = NET_HDR_LEN + frame.len();
        assert_eq!(len as usize, want_len, "{case}: used length");
        let buf = self.rx[head as usize];
        let got = self.d.get(buf.addr, want_len);
        let mut header = [0u8; NET_HDR_LEN];
        header[10] = 1; // num_buffers = 1, everything else zero
        assert_eq!(got[..NET_HDR_LEN], header, "{case}: virtio-net header");
        assert_eq!(&got[NET_HDR_LEN..], frame, "{case}: frame bytes");
        self.d.verify(case, &[(buf.addr, want_len as u64)]);
    }

    /// Check that nothing arrives within [`SETTLE`] and nothing was written.
    pub fn expect_nothing(&mut self, case: &str) {
        self.d.assert_nothing_used(RX, SETTLE);
        self.d.verify(case, &[]);
    }
}

/// An Ethernet frame from `src` to `dst` with the local experimental ethertype 0x88b5.
pub fn frame(dst: Mac, src: Mac, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&0x88b5u16.to_be_bytes());
    f.extend_from_slice(payload);
    f
}
