//! `virtiod serve … net:tap=NAME` with the real binary: the tap it creates is moved into a
//! network namespace of the test's own (192.0.2.1/24, up), and a testkit frontend with
//! 52:54:00:00:00:02 / 192.0.2.2 resolves 192.0.2.1 by ARP and pings it. SIGTERM removes the
//! tap. Needs root and `/dev/net/tun`; all traffic stays inside the namespace.

mod common;

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use virtiod_net::{Mac, FEATURES, NET_HDR_LEN};
use virtiod_testkit::frontend::{Desc, Driver, Options};

const GUEST_MAC: Mac = [0x52, 0x54, 0, 0, 0, 0x02];
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const TAP_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const RX: usize = 0;
const TX: usize = 1;
const RX_BUF: u32 = 2048;
const RX_BUFFERS: u16 = 8;
/// Frames of other kinds (IPv6 neighbour discovery, MLD) the namespace may send meanwhile.
const MAX_OTHER_FRAMES: usize = 64;
const ETH_ARP: u16 = 0x0806;
const ETH_IPV4: u16 = 0x0800;

/// `ip ARGS`, panicking with its stderr on failure.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace, deleted at drop (also when the test fails).
struct Netns(String);

impl Netns {
    fn new(name: String) -> Self {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        Self(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Whether this test can run here; `None` when it can.
fn missing_prerequisite() -> Option<String> {
    if !Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing: load the tun module (modprobe tun)".into());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("creating a tap and a network namespace needs root".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("the ip command (iproute2) is missing".into());
    }
    None
}

/// The interface's MAC address in namespace `ns`.
fn mac_in(ns: &str, dev: &str) -> Mac {
    let out = Command::new("ip")
        .args(["-n", ns, "-o", "link", "show", dev])
        .output()
        .expect("run ip");
    let text = String::from_utf8_lossy(&out.stdout);
    let mac = text
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC for {dev}: {text}"));
    let bytes: Vec<u8> = mac
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    bytes.try_into().unwrap()
}

/// The Internet checksum (RFC 1071) of `bytes`.
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ethernet(dst: Mac, src: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An ARP request from the guest for `target`.
fn arp_request(target: Ipv4Addr) -> Vec<u8> {
    let mut arp = vec![0, 1, 0x08, 0x00, 6, 4, 0, 1]; // Ethernet, IPv4, request
    arp.extend_from_slice(&GUEST_MAC);
    arp.extend_from_slice(&GUEST_IP.octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&target.octets());
    ethernet([0xff; 6], GUEST_MAC, ETH_ARP, &arp)
}

/// An ICMP echo request from the guest to `dst` (at `dst_mac`).
fn echo_request(dst_mac: Mac, dst: Ipv4Addr, id: u16, seq: u16, data: &[u8]) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(data);
    let sum = checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut ipv4 = vec![0x45, 0];
    ipv4.extend_from_slice(&total.to_be_bytes());
    ipv4.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, 1, 0, 0]); // id, DF, TTL, ICMP
    ipv4.extend_from_slice(&GUEST_IP.octets());
    ipv4.extend_from_slice(&dst.octets());
    let sum = checksum(&ipv4);
    ipv4[10..12].copy_from_slice(&sum.to_be_bytes());
    ipv4.extend_from_slice(&icmp);
    ethernet(dst_mac, GUEST_MAC, ETH_IPV4, &ipv4)
}

fn ethertype(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[12], frame[13]])
}

/// The guest: its frontend and its receive buffers (by head).
struct Guest {
    d: Driver,
    rx: Vec<Desc>,
    tx_head: u16,
    /// Used rx entries read from the ring and not yet looked at.
    rx_used: VecDeque<(u32, u32)>,
    /// Used rx entries read from the ring so far.
    rx_seen: u16,
}

impl Guest {
    fn connect(socket: &Path) -> Self {
        let opts = Options::queues(2).features(FEATURES);
        let mut d = Driver::connect_opts(socket, &opts);
        let rx: Vec<Desc> = (0..RX_BUFFERS).map(|_| d.writable(RX_BUF)).collect();
        d.write_table_at(RX, 0, &rx);
        d.make_available(RX, &(0..RX_BUFFERS).collect::<Vec<_>>());
        Self {
            d,
            rx,
            tx_head: 0,
            rx_used: VecDeque::new(),
            rx_seen: 0,
        }
    }

    /// Send `frame` behind a zeroed header and wait for its completion.
    fn send(&mut self, frame: &[u8]) {
        let mut bytes = vec![0u8; NET_HDR_LEN];
        bytes.extend_from_slice(frame);
        let buf = self.d.readable(&bytes);
        let head = self.tx_head;
        self.tx_head += 1;
        self.d.write_table_at(TX, head, &[buf]);
        self.d.make_available(TX, &[head]);
        assert_eq!(self.d.wait_used(TX, 1), [(u32::from(head), 0)]);
        let rx = self.rx_ranges();
        self.d.verify("tx", &rx);
    }

    /// The receive buffers: frames from the namespace may land in any of them at any time.
    fn rx_ranges(&self) -> Vec<(u64, u64)> {
        self.rx.iter().map(|b| (b.addr, u64::from(b.len))).collect()
    }

    /// The next received frame (its one-buffer header checked; the buffer posted again).
    fn receive(&mut self, case: &str) -> Vec<u8> {
        let (head, len) = self.next_used(case);
        let len = len as usize;
        assert!(len > NET_HDR_LEN + 14, "{case}: used length {len}");
        let buf = self.rx[head as usize];
        let got = self.d.get(buf.addr, len);
        let mut header = [0u8; NET_HDR_LEN];
        header[10] = 1; // num_buffers = 1, no offload flags
        assert_eq!(got[..NET_HDR_LEN], header, "{case}: virtio-net header");
        let rx = self.rx_ranges();
        self.d.verify(case, &rx);
        self.d.make_available(RX, &[head as u16]);
        got[NET_HDR_LEN..].to_vec()
    }

    /// The next used rx entry (several may be published at once).
    fn next_used(&mut self, case: &str) -> (u32, u32) {
        if self.rx_used.is_empty() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.d.used_idx(RX) == self.rx_seen {
                assert!(
                    Instant::now() < deadline,
                    "{case}: nothing received in 10 s"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            let new = self.d.used_idx(RX).wrapping_sub(self.rx_seen);
            self.rx_seen = self.rx_seen.wrapping_add(new);
            self.rx_used.extend(self.d.wait_used(RX, new));
        }
        self.rx_used.pop_front().unwrap()
    }

    /// Receive until a frame `wanted` accepts, skipping others (IPv6 chatter).
    fn receive_matching(&mut self, case: &str, wanted: impl Fn(&[u8]) -> bool) -> Vec<u8> {
        for _ in 0..MAX_OTHER_FRAMES {
            let frame = self.receive(case);
            if wanted(&frame) {
                return frame;
            }
        }
        panic!("{case}: not received among {MAX_OTHER_FRAMES} frames");
    }
}

#[test]
fn a_tap_in_a_netns_answers_arp_and_ping_and_goes_away_at_sigterm() {
    if let Some(reason) = missing_prerequisite() {
        skip_or_fail(&reason);
        return;
    }
    let pid = std::process::id();
    let tap = format!("vtt{}", pid % 10000);
    let ns = Netns::new(format!("virtiod-tap-{pid}"));
    let dir = Scratch::new("net-tap");
    let sock = dir.path("n0.sock");
    let daemon = Daemon::start(
        &sock,
        &format!("net:tap={tap}"),
        &["--mac", "52:54:00:00:00:02"],
    );
    // The daemon listens only once the tap is made.
    assert!(
        Path::new("/sys/class/net").join(&tap).exists(),
        "tap {tap} created"
    );
    // Less IPv6 chatter to skip (best effort: the frames are filtered anyway).
    let _ = Command::new("ip")
        .args(["netns", "exec", &ns.0, "sysctl", "-qw"])
        .arg("net.ipv6.conf.default.disable_ipv6=1")
        .output();
    ip(&["link", "set", &tap, "netns", &ns.0]);
    ip(&["-n", &ns.0, "addr", "add", "192.0.2.1/24", "dev", &tap]);
    ip(&["-n", &ns.0, "link", "set", &tap, "up"]);
    let tap_mac = mac_in(&ns.0, &tap);

    let mut guest = Guest::connect(&sock);

    // ARP: who has 192.0.2.1? The tap's address answers, to the guest.
    guest.send(&arp_request(TAP_IP));
    let reply = guest.receive_matching("ARP reply", |f| ethertype(f) == ETH_ARP);
    assert_eq!(reply[0..6], GUEST_MAC, "to the guest");
    assert_eq!(reply[6..12], tap_mac, "from the tap");
    let arp = &reply[14..];
    assert_eq!(arp[0..8], [0, 1, 0x08, 0x00, 6, 4, 0, 2], "an ARP reply");
    assert_eq!(arp[8..14], tap_mac, "sender MAC");
    assert_eq!(arp[14..18], TAP_IP.octets(), "sender IP");
    assert_eq!(arp[18..24], GUEST_MAC, "target MAC");
    assert_eq!(arp[24..28], GUEST_IP.octets(), "target IP");

    // ICMP echo to 192.0.2.1: the reply comes back with the same id, sequence and data.
    let data: Vec<u8> = (0..56).collect();
    guest.send(&echo_request(tap_mac, TAP_IP, 0x7a7a, 1, &data));
    let reply = guest.receive_matching("echo reply", |f| {
        ethertype(f) == ETH_IPV4 && f.len() >= 34 && f[23] == 1
    });
    assert_eq!(reply[0..6], GUEST_MAC);
    assert_eq!(reply[6..12], tap_mac);
    let ipv4 = &reply[14..];
    let ihl = usize::from(ipv4[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ipv4[2], ipv4[3]]));
    assert_eq!(checksum(&ipv4[..ihl]), 0, "IPv4 header checksum");
    assert_eq!(ipv4[12..16], TAP_IP.octets(), "from 192.0.2.1");
    assert_eq!(ipv4[16..20], GUEST_IP.octets(), "to 192.0.2.2");
    let icmp = &ipv4[ihl..total];
    assert_eq!(checksum(icmp), 0, "ICMP checksum");
    assert_eq!(icmp[0..2], [0, 0], "an echo reply");
    assert_eq!(icmp[4..8], [0x7a, 0x7a, 0, 1], "id and sequence");
    assert_eq!(&icmp[8..], &data[..], "echoed data");

    // SIGTERM: exit 0, and the tap the daemon created is gone (from the namespace too).
    let status = daemon.terminate();
    assert!(status.success(), "{status}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let shown = Command::new("ip")
            .args(["-n", &ns.0, "link", "show", &tap])
            .output()
            .expect("run ip");
        if !shown.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "tap {tap} still exists");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!sock.exists(), "socket removed");
}
