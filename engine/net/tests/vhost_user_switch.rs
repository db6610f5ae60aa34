//! Two virtio-net devices on two ports of one in-process switch, each served over vhost-user
//! on its own socket; two testkit frontends post receive buffers and send frames, and check
//! what arrived, with which header, and that nothing outside the buffers changed.

use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;
use virtiod_net::{Mac, NetBackend, NetConfig, NetDevice, Switch, SwitchPort, FEATURES};
use virtiod_testkit::net::{frame, NetGuest, RX, RX_BUFFERS};
use virtiod_testkit::scratch::Scratch;
use virtiod_vhost_user::{bind_socket, Server, VhostUserDevice};

const MAC_A: Mac = [0x52, 0x54, 0, 0, 0, 0xa];
const MAC_B: Mac = [0x52, 0x54, 0, 0, 0, 0xb];
const BROADCAST: Mac = [0xff; 6];

/// Serve a virtio-net device with `mac` on `port` at `dir/name.sock`.
fn serve(dir: &Scratch, name: &str, mac: Mac, port: Arc<SwitchPort>) -> Server {
    let sock = dir.0.join(format!("{name}.sock"));
    let dev = NetDevice::new(NetConfig::new(mac), port).unwrap();
    let vu = VhostUserDevice::new(Arc::new(dev), Duration::ZERO).unwrap();
    let listener = bind_socket(&sock).unwrap();
    vu.spawn(listener, &sock, name, |r| panic!("serving ended: {r:?}"))
        .unwrap()
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

    let mut a = NetGuest::connect(server_a.socket(), FEATURES);
    let mut b = NetGuest::connect(server_b.socket(), FEATURES);
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
