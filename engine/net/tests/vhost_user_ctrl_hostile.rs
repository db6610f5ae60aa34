//! A virtio-net device served over vhost-user to a testkit frontend: the control queue and a
//! second queue pair (offered over vhost-user), and hostile tx chains and receive buffers,
//! each counted and dropped without touching driver memory outside the buffers.

use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;
use virtiod_net::offload::{F_CSUM, HDR_F_NEEDS_CSUM};
use virtiod_net::{
    Mac, NetBackend, NetConfig, NetDevice, Switch, SwitchPort, CTRL_FEATURES, FEATURES, F_MQ,
    F_MRG_RXBUF, NET_HDR_LEN,
};
use virtiod_testkit::frontend::{linked_from, Desc, Driver, Options};
use virtiod_testkit::scratch::Scratch;
use virtiod_vhost_user::{bind_socket, Server, VhostUserDevice};

const MAC: Mac = [0x52, 0x54, 0, 0, 0, 0xa];
const PEER: Mac = [0x52, 0x54, 0, 0, 0, 0xb];
const SETTLE: Duration = Duration::from_millis(100);

fn serve(dir: &Scratch, cfg: NetConfig, port: Arc<SwitchPort>) -> Server {
    let sock = dir.0.join("net.sock");
    let dev = NetDevice::new(cfg, port).unwrap();
    let vu = VhostUserDevice::new(Arc::new(dev), Duration::ZERO).unwrap();
    let listener = bind_socket(&sock).unwrap();
    vu.spawn(listener, &sock, "net", |r| panic!("serving ended: {r:?}"))
        .unwrap()
}

/// A header (`hdr`) and an Ethernet frame to `dst` from the device, `len` bytes long.
fn frame(hdr: [u8; NET_HDR_LEN], dst: Mac, len: usize) -> Vec<u8> {
    let mut f = hdr.to_vec();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&0x88b5u16.to_be_bytes());
    f.extend((14..len).map(|i| i as u8));
    f
}

/// Send control command `command` on queue `q` with head `head`; the status written.
fn control(d: &mut Driver, q: usize, head: u16, command: &[u8]) -> u8 {
    let cmd = d.readable(command);
    let status = d.writable(1);
    d.write_table_at(q, head, &linked_from(head, &[cmd, status]));
    d.make_available(q, &[head]);
    assert_eq!(d.wait_used(q, 1), [(u32::from(head), 1)], "{command:?}");
    d.verify("control", &[status.range()]);
    d.get(status.addr, 1)[0]
}

#[test]
fn the_control_queue_sets_the_mac_and_queue_pairs_over_vhost_user() {
    let dir = Scratch::new("ctrl");
    let switch = Switch::new("ctrl-test");
    let port = switch.port().unwrap();
    let cfg = NetConfig {
        control_queue: true,
        ..NetConfig::new(MAC)
    };
    let server = serve(&dir, cfg, port.clone());
    let features = FEATURES | CTRL_FEATURES;
    let mut d = Driver::connect_opts(server.socket(), &Options::queues(3).features(features));
    assert_eq!(d.num_queues(), 3, "rx, tx and the control queue");
    assert_eq!(d.offered_features() & (CTRL_FEATURES | F_MQ), CTRL_FEATURES);
    const CTRL: usize = 2;
    assert_eq!(
        control(&mut d, CTRL, 0, &[0, 0, 1]),
        0,
        "promiscuous on: OK"
    );
    assert_eq!(
        control(&mut d, CTRL, 2, &[4, 0, 2, 0]),
        1,
        "2 pairs of 1: ERR"
    );
    assert_eq!(control(&mut d, CTRL, 4, &[4, 0, 1, 0]), 0, "1 pair: OK");
    let new_mac = [0x02, 0, 0, 0, 0, 0x42];
    assert_eq!(
        control(&mut d, CTRL, 6, &[&[1, 1][..], &new_mac].concat()),
        0
    );
    let (_, cfg) =
        d.fe.get_config(0, 6, VhostUserConfigFlags::WRITABLE, &[0; 6])
            .unwrap();
    assert_eq!(
        cfg, new_mac,
        "MAC_ADDR_SET shows in the configuration space"
    );
    assert_eq!(control(&mut d, CTRL, 8, &[9, 9]), 1, "unknown class: ERR");
    server.stop(Duration::from_secs(5)).unwrap();
}

#[test]
fn a_second_queue_pair_sends_and_the_first_receives_until_the_driver_asks_for_more() {
    let dir = Scratch::new("mq");
    let switch = Switch::new("mq-test");
    let port = switch.port_with_pairs(2).unwrap();
    let peer = switch.port().unwrap();
    let cfg = NetConfig {
        queue_pairs: 2,
        control_queue: true,
        ..NetConfig::new(MAC)
    };
    let server = serve(&dir, cfg, port.clone());
    // The testkit frontend drives 4 queues: both pairs, not the control queue.
    let features = FEATURES | CTRL_FEATURES | F_MQ;
    let mut d = Driver::connect_opts(server.socket(), &Options::queues(4).features(features));
    let (_, cfg) =
        d.fe.get_config(8, 2, VhostUserConfigFlags::WRITABLE, &[0; 2])
            .unwrap();
    assert_eq!(cfg, 2u16.to_le_bytes(), "max_virtqueue_pairs");
    let rx0 = d.writable(2048);
    let rx1 = d.writable(2048);
    d.write_table_at(0, 0, &[rx0]);
    d.make_available(0, &[0]);
    d.write_table_at(2, 0, &[rx1]);
    d.make_available(2, &[0]);
    // tx on the second pair reaches the peer.
    let out = frame([0; NET_HDR_LEN], PEER, 100);
    let buf = d.readable(&out);
    d.write_table_at(3, 0, &[buf]);
    d.make_available(3, &[0]);
    assert_eq!(d.wait_used(3, 1), [(0, 0)]);
    let mut got = Vec::new();
    assert!(peer.receive(0, &mut got));
    assert_eq!(got, out);
    // Before VQ_PAIRS_SET the driver uses one pair: frames come on rx queue 0.
    let back = [&[0; NET_HDR_LEN][..], &MAC, &PEER, &[0x88, 0xb5, 1, 2, 3]].concat();
    peer.transmit(&back);
    assert_eq!(d.wait_used(0, 1), [(0, back.len() as u32)]);
    d.assert_nothing_used(2, SETTLE);
    assert_eq!(
        d.get(rx0.addr + NET_HDR_LEN as u64, back.len() - NET_HDR_LEN),
        back[NET_HDR_LEN..]
    );
    server.stop(Duration::from_secs(5)).unwrap();
}

#[test]
fn hostile_tx_chains_and_small_rx_buffers_are_counted_and_dropped() {
    let dir = Scratch::new("hostile");
    let switch = Switch::new("hostile-test");
    let port = switch.port().unwrap();
    let peer = switch.port().unwrap();
    let server = serve(&dir, NetConfig::new(MAC), port.clone());
    // Partial checksums accepted, no MRG_RXBUF: a frame must fit one receive buffer.
    let features = (FEATURES & !F_MRG_RXBUF) | F_CSUM;
    let mut d = Driver::connect_opts(server.socket(), &Options::queues(2).features(features));
    const RX: usize = 0;
    const TX: usize = 1;
    let mut head = 0u16;
    let mut send = |d: &mut Driver, descs: &[Desc]| {
        d.write_table_at(TX, head, &linked_from(head, descs));
        d.make_available(TX, &[head]);
        assert_eq!(d.wait_used(TX, 1), [(u32::from(head), 0)]);
        d.verify("tx", &[]);
        head += descs.len() as u16;
    };
    // Shorter than the header, a header without a frame behind, a frame above MTU + 18.
    let short = d.readable(&[0; 8]);
    send(&mut d, &[short]);
    let bare = d.readable(&[0; NET_HDR_LEN]);
    send(&mut d, &[bare]);
    let big = d.readable(&frame([0; NET_HDR_LEN], PEER, 1500 + 18 + 1));
    send(&mut d, &[big]);
    // A partial checksum beyond the frame; a GSO frame (HOST_TSO4 not accepted).
    let mut hdr = [0; NET_HDR_LEN];
    hdr[0] = HDR_F_NEEDS_CSUM;
    hdr[6..8].copy_from_slice(&60u16.to_le_bytes());
    let beyond = d.readable(&frame(hdr, PEER, 60));
    send(&mut d, &[beyond]);
    let mut gso = [0; NET_HDR_LEN];
    gso[..2].copy_from_slice(&[HDR_F_NEEDS_CSUM, 1]);
    gso[4] = 100;
    let gso = d.readable(&frame(gso, PEER, 200));
    send(&mut d, &[gso]);
    // A device-writable buffer in a tx chain.
    let good = frame([0; NET_HDR_LEN], PEER, 60);
    let (h, w) = (d.readable(&good[..NET_HDR_LEN]), d.writable(60));
    send(&mut d, &[h, w]);
    let s = port.stats().snapshot();
    assert_eq!(
        (s.tx_packets, s.tx_malformed, s.tx_too_big, s.tx_bad_header),
        (0, 3, 1, 2),
        "{s:?}"
    );
    let mut got = Vec::new();
    assert!(!peer.receive(0, &mut got), "nothing was forwarded");

    // Receive buffers: one smaller than the header (refused at once), one too small for the
    // frame that comes (without MRG_RXBUF: the frame is dropped, the buffer kept), one big.
    let tiny = d.writable(NET_HDR_LEN as u32 - 1);
    let small = d.writable(64);
    let large = d.writable(2048);
    d.write_table_at(RX, 0, &[tiny, small, large]);
    d.make_available(RX, &[0]);
    assert_eq!(d.wait_used(RX, 1), [(0, 0)]);
    d.make_available(RX, &[1]);
    let long = [&[0; NET_HDR_LEN][..], &MAC, &PEER, &[0x88, 0xb5], &[7; 200]].concat();
    peer.transmit(&long);
    d.assert_nothing_used(RX, SETTLE);
    d.make_available(RX, &[2]);
    let fits = [&[0; NET_HDR_LEN][..], &MAC, &PEER, &[0x88, 0xb5], &[8; 30]].concat();
    peer.transmit(&fits);
    assert_eq!(d.wait_used(RX, 1), [(1, fits.len() as u32)]);
    d.verify("rx", &[small.range()]);
    let s = port.stats().snapshot();
    assert_eq!(
        (s.rx_malformed, s.rx_too_big, s.rx_packets),
        (1, 1, 1),
        "{s:?}"
    );
    server.stop(Duration::from_secs(5)).unwrap();
}
