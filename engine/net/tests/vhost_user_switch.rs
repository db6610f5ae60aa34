//! Two virtio-net devices on two ports of one in-process switch, each served over vhost-user
//! on its own socket; two testkit frontends post receive buffers and send frames, and check
//! what arrived, with which header, and that nothing outside the buffers changed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;
use virtiod_net::{
    Mac, NetBackend, NetConfig, NetDevice, Switch, SwitchPort, FEATURES, NET_HDR_LEN,
};
use virtiod_testkit::frontend::{Desc, Driver, Options};
use virtiod_vhost_user::{bind_socket, Server, VhostUserDevice};

const MAC_A: Mac = [0x52, 0x54, 0, 0, 0, 0xa];
const MAC_B: Mac = [0x52, 0x54, 0, 0, 0, 0xb];
const BROADCAST: Mac = [0xff; 6];
const RX: usize = 0;
const TX: usize = 1;
const RX_BUF: u32 = 2048;
const RX_BUFFERS: u16 = 4;
const SETTLE: Duration = Duration::from_millis(100);

/// A scratch directory removed at drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("virtiod-net-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Serve a virtio-net device with `mac` on `port` at `dir/name.sock`.
fn serve(dir: &Scratch, name: &str, mac: Mac, port: Arc<SwitchPort>) -> Server {
    let sock = dir.0.join(format!("{name}.sock"));
    let dev = NetDevice::new(NetConfig::new(mac), port).unwrap();
    let vu = VhostUserDevice::new(Arc::new(dev), Duration::ZERO).unwrap();
    let listener = bind_socket(&sock).unwrap();
    vu.spawn(listener, &sock, name, |r| panic!("serving ended: {r:?}"))
        .unwrap()
}

/// A guest: its frontend and the receive buffers it posted (by head).
struct Guest {
    d: Driver,
    rx: Vec<Desc>,
}

impl Guest {
    fn connect(server: &Server) -> Self {
        let opts = Options::queues(2).features(FEATURES);
        let mut d = Driver::connect_opts(server.socket(), &opts);
        assert_eq!(d.num_queues(), 2);
        // Post the receive buffers, one descriptor each, heads 0..RX_BUFFERS.
        let rx: Vec<Desc> = (0..RX_BUFFERS).map(|_| d.writable(RX_BUF)).collect();
        d.write_table_at(RX, 0, &rx);
        d.make_available(RX, &(0..RX_BUFFERS).collect::<Vec<_>>());
        Self { d, rx }
    }

    /// Send `frame` (one readable buffer: header + frame) and wait for its completion.
    fn send(&mut self, head: u16, frame: &[u8]) {
        let mut bytes = vec![0u8; NET_HDR_LEN];
        bytes.extend_from_slice(frame);
        let buf = self.d.readable(&bytes);
        self.d.write_table_at(TX, head, &[buf]);
        self.d.make_available(TX, &[head]);
        assert_eq!(self.d.wait_used(TX, 1), [(u32::from(head), 0)]);
        self.d.verify("tx", &[]);
    }

    /// Wait for one received frame; check it is `frame` with a header of one buffer and
    /// that the device wrote nothing beyond it.
    fn expect(&mut self, case: &str, frame: &[u8]) {
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

    fn expect_nothing(&mut self, case: &str) {
        self.d.assert_nothing_used(RX, SETTLE);
        self.d.verify(case, &[]);
    }
}

fn frame(dst: Mac, src: Mac, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&0x88b5u16.to_be_bytes()); // local experimental ethertype
    f.extend_from_slice(payload);
    f
}

#[test]
fn two_guests_on_one_switch_exchange_broadcast_and_learned_unicast_frames() {
    let dir = Scratch::new("switch");
    let switch = Switch::new("vhost-user-test");
    let (port_a, port_b) = (switch.port().unwrap(), switch.port().unwrap());
    let server_a = serve(&dir, "a", MAC_A, port_a.clone());
    let server_b = serve(&dir, "b", MAC_B, port_b.clone());
    // A third port without a device shows what was flooded.
    let watcher = switch.port().unwrap();

    let mut a = Guest::connect(&server_a);
    let mut b = Guest::connect(&server_b);
    let offered = a.d.offered_features();
    assert_eq!(offered & FEATURES, FEATURES, "offered {offered:#x}");
    let (_, cfg) =
        a.d.fe
            .get_config(0, 12, VhostUserConfigFlags::WRITABLE, &[0; 12])
            .unwrap();
    assert_eq!(cfg[..6], MAC_A, "config space: mac");
    assert_eq!(
        cfg[6..12],
        [1, 0, 1, 0, 0xdc, 0x05],
        "LINK_UP, 1 pair, MTU 1500"
    );

    // A broadcasts: B and the watcher get it, A does not.
    let hello = frame(BROADCAST, MAC_A, &[0x11; 100]);
    a.send(0, &hello);
    b.expect("broadcast from A", &hello);
    a.expect_nothing("A's own broadcast");
    assert_eq!(watcher.queued(), 1);

    // A to B (B unknown yet: flooded, so the watcher gets it too).
    let to_b = frame(MAC_B, MAC_A, &(0..=255).collect::<Vec<u8>>());
    a.send(1, &to_b);
    b.expect("unicast A to B", &to_b);
    a.expect_nothing("A's own unicast");
    assert_eq!(watcher.queued(), 2);

    // B replies to A, whose address the switch learned: A only.
    let to_a = frame(MAC_A, MAC_B, &[0x22; 1000]);
    b.send(0, &to_a);
    a.expect("unicast B to A", &to_a);
    b.expect_nothing("B's own reply");
    assert_eq!(watcher.queued(), 2, "a learned address is not flooded");

    // Now both are learned: A to B is not flooded either.
    a.send(2, &to_b);
    b.expect("unicast A to B, learned", &to_b);
    assert_eq!(watcher.queued(), 2);

    let (sa, sb) = (port_a.stats().snapshot(), port_b.stats().snapshot());
    assert_eq!(
        (sa.tx_packets, sa.rx_packets, sa.rx_bytes),
        (3, 1, to_a.len() as u64)
    );
    assert_eq!((sb.tx_packets, sb.rx_packets), (1, 3));
    assert_eq!(
        sa.tx_malformed + sa.tx_too_big + sa.rx_queue_full + sa.rx_too_big,
        0
    );

    // Stopping with the frontends connected gives the unused receive buffers back, empty.
    server_a.stop(Duration::from_secs(5)).unwrap();
    server_b.stop(Duration::from_secs(5)).unwrap();
    let unused = a.d.wait_used(RX, RX_BUFFERS - 1);
    assert!(unused.iter().all(|&(_, len)| len == 0), "{unused:?}");
    a.d.verify("stop", &[]);
}
