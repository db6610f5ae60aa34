//! `virtiod run` with two virtio-net devices on one in-process switch, each over vhost-user:
//! two testkit frontends exchange a broadcast and a unicast frame through the daemon, `ctl
//! list` shows both with their MAC addresses, and `ctl stats` and `/metrics` count exactly the
//! frames and bytes each sent and received.

mod common;
mod ops_common;

use common::*;
use ops_common::*;
use virtiod_net::{Mac, FEATURES};
use virtiod_testkit::net::{frame, NetGuest};

const MAC_A: Mac = [0x52, 0x54, 0, 0x12, 0x34, 0x0a];
const BROADCAST: Mac = [0xff; 6];

/// Every drop counter a net device has, as (direction, reason).
const DROPS: [(&str, &str); 7] = [
    ("rx", "queue_full"),
    ("rx", "too_big"),
    ("rx", "malformed"),
    ("rx", "offload"),
    ("tx", "too_big"),
    ("tx", "malformed"),
    ("tx", "bad_header"),
];

/// The `ctl stats` line of a net device that received `rx` and sent `tx` (packets, bytes)
/// and dropped nothing.
fn stats_line(name: &str, rx: (usize, usize), tx: (usize, usize)) -> String {
    format!(
        "{name} rx={}/{}B tx={}/{}B rx_drop_malformed=0 rx_drop_offload=0 rx_drop_queue_full=0 \
         rx_drop_too_big=0 tx_drop_bad_header=0 tx_drop_malformed=0 tx_drop_too_big=0",
        rx.0, rx.1, tx.0, tx.1
    )
}

/// "52:54:00:12:34:0a" to bytes.
fn mac_of(text: &str) -> Mac {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    bytes.try_into().unwrap()
}

#[test]
fn two_net_devices_on_one_switch_exchange_frames_through_the_daemon() {
    let dir = Scratch::new("net-switch");
    let (sock_a, sock_b) = (dir.path("a.sock"), dir.path("b.sock"));
    let control = dir.path("control.sock");
    let cfg = dir.path("devices.toml");
    let text = format!(
        "[[device]]\nname = \"a\"\nnet = \"switch:sw0\"\nvhost-user = \"{}\"\nmac = \"52:54:00:12:34:0a\"\nmtu = 1500\n\n\
         [[device]]\nname = \"b\"\nnet = \"switch:sw0\"\nvhost-user = \"{}\"\n",
        sock_a.display(),
        sock_b.display()
    );
    std::fs::write(&cfg, text).unwrap();
    let control_arg = control.to_str().unwrap();
    let port = free_port();
    let metrics_arg = format!("127.0.0.1:{port}");
    let daemon = RunDaemon::start(
        &cfg,
        &["--control", control_arg, "--metrics", &metrics_arg],
        &[sock_a.clone(), sock_b.clone()],
    );
    wait_for_port(port);

    // ctl list: both net devices, A with its MAC, B with one derived from its socket path (locally administered).
    let (code, out, err) = ctl(&control, &["list"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].starts_with("a vhost-user ")
            && lines[0].ends_with(" up net=switch:sw0 mac=52:54:00:12:34:0a"),
        "{out}"
    );
    let mac_b = mac_of(lines[1].rsplit_once("mac=").expect("a MAC for b").1);
    assert!(lines[1].starts_with("b vhost-user "), "{out}");
    assert_eq!(mac_b[0] & 0x03, 0x02, "locally administered unicast: {out}");
    // Nothing sent yet: both net devices are listed by stats, with zeros.
    let (code, out, err) = ctl(&control, &["stats"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        format!(
            "{}\n{}\n",
            stats_line("a", (0, 0), (0, 0)),
            stats_line("b", (0, 0), (0, 0))
        ),
    );

    let mut a = NetGuest::connect(&sock_a, FEATURES);
    let mut b = NetGuest::connect(&sock_b, FEATURES);

    // A broadcasts: B gets it, A does not.
    let hello = frame(BROADCAST, MAC_A, &[0x11; 100]);
    a.send(0, &hello);
    b.expect("broadcast from A", &hello);
    a.expect_nothing("A's own broadcast");

    // B answers A by unicast, to the address the switch learned from the broadcast.
    let to_a = frame(MAC_A, mac_b, &(0..=255).collect::<Vec<u8>>());
    b.send(0, &to_a);
    a.expect("unicast B to A", &to_a);
    b.expect_nothing("B's own unicast");

    // And A to B, now that B's address is learned too.
    let to_b = frame(mac_b, MAC_A, &[0x22; 1000]);
    a.send(1, &to_b);
    b.expect("unicast A to B", &to_b);

    // A sent the broadcast and to_b, received to_a; B the other way round. Bytes are the
    // frames without the virtio-net header; nothing was dropped.
    let a_sent = (2, hello.len() + to_b.len());
    let b_sent = (1, to_a.len());
    let (code, out, err) = ctl(&control, &["stats", "a"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, format!("{}\n", stats_line("a", b_sent, a_sent)));
    let (code, out, err) = ctl(&control, &["stats"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        format!(
            "{}\n{}\n",
            stats_line("a", b_sent, a_sent),
            stats_line("b", a_sent, b_sent)
        ),
    );

    let (status, text) = http_get(port, "/metrics");
    assert!(status.contains("200"), "{status}");
    let get = |series: String| {
        sample(&text, &series).unwrap_or_else(|| panic!("no {series} in:\n{text}"))
    };
    for (device, rx, tx) in [("a", b_sent, a_sent), ("b", a_sent, b_sent)] {
        let dev = format!(r#"device="{device}""#);
        assert_eq!(
            get(format!("virtiod_net_rx_packets_total{{{dev}}}")),
            rx.0 as f64
        );
        assert_eq!(
            get(format!("virtiod_net_rx_bytes_total{{{dev}}}")),
            rx.1 as f64
        );
        assert_eq!(
            get(format!("virtiod_net_tx_packets_total{{{dev}}}")),
            tx.0 as f64
        );
        assert_eq!(
            get(format!("virtiod_net_tx_bytes_total{{{dev}}}")),
            tx.1 as f64
        );
        for (direction, reason) in DROPS {
            let series = format!(
                r#"virtiod_net_drops_total{{{dev},direction="{direction}",reason="{reason}"}}"#
            );
            assert_eq!(get(series), 0.0);
        }
        assert_eq!(get(format!("virtiod_device_up{{{dev}}}")), 1.0);
        // Net devices have no blk request counters.
        assert!(
            !text.contains(&format!("virtiod_requests_total{{{dev}")),
            "{text}"
        );
    }

    let (status, stdout) = daemon.terminate();
    assert!(status.success(), "{status}");
    assert!(
        stdout.contains(&format!("a {}", sock_a.display()))
            && stdout.contains(&format!("b {}", sock_b.display())),
        "{stdout}"
    );
    assert!(!sock_a.exists() && !sock_b.exists(), "sockets removed");
}
