use super::*;

const ALL: u64 = OFFLOAD_FEATURES;

/// An Ethernet frame (with a virtio-net header in front) carrying TCP over IPv4 (or IPv6)
/// with `payload` bytes; the TCP checksum field holds the pseudo-header sum, as a driver
/// with a partial checksum leaves it; NEEDS_CSUM set, GSO `gso_size` if not 0.
fn tcp_frame(ipv4: bool, vlan: bool, payload: usize, gso_size: u16) -> Vec<u8> {
    let mut f = vec![0u8; NET_HDR_LEN];
    f.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 0xb, 0x52, 0x54, 0, 0, 0, 0xa]);
    if vlan {
        f.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
    }
    let l3 = f.len() - NET_HDR_LEN + 2; // after the ethertype
    let tcp_len = 32 + payload; // 12 bytes of TCP options
    if ipv4 {
        f.extend_from_slice(&[0x08, 0x00, 0x45, 0x00]);
        f.extend_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
        f.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, IPPROTO_TCP, 0, 0]);
        f.extend_from_slice(&[198, 51, 100, 2, 198, 51, 100, 1]);
    } else {
        f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
        f.extend_from_slice(&(tcp_len as u16).to_be_bytes());
        f.extend_from_slice(&[IPPROTO_TCP, 64]);
        f.extend((0..32).map(|i| 0x20 + i as u8));
    }
    let l4 = f.len() - NET_HDR_LEN;
    f.extend_from_slice(&[0x9c, 0x40, 0x00, 0x50]); // ports
    f.extend_from_slice(&0xffff_fff0u32.to_be_bytes()); // seq, wraps
    f.extend_from_slice(&1u32.to_be_bytes()); // ack
    f.extend_from_slice(&[
        0x80,
        TCP_PSH | TCP_FIN | TCP_CWR | 0x10,
        0xff,
        0xff,
        0,
        0,
        0,
        0,
    ]);
    f.extend_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
    f.extend((0..payload).map(|i| (i * 7 + i / 251) as u8));
    let p = &f[NET_HDR_LEN..];
    let addrs = if ipv4 {
        &p[l3 + 12..l3 + 20]
    } else {
        &p[l3 + 8..l3 + 40]
    };
    let pseudo = !fold(sum_words(u64::from(IPPROTO_TCP) + tcp_len as u64, addrs));
    let at = NET_HDR_LEN + l4 + TCP_CSUM_AT;
    f[at..at + 2].copy_from_slice(&pseudo.to_be_bytes());
    let hdr = NetHdr {
        flags: HDR_F_NEEDS_CSUM,
        gso_type: match (gso_size, ipv4) {
            (0, _) => GSO_NONE,
            (_, true) => GSO_TCPV4,
            (_, false) => GSO_TCPV6,
        },
        hdr_len: (l4 + 32) as u16,
        gso_size,
        csum_start: l4 as u16,
        csum_offset: TCP_CSUM_AT as u16,
    };
    hdr.write(&mut f);
    f
}

/// Whether the TCP checksum of `frame` (header and packet, no offload) is right: the sum
/// over the pseudo-header and the segment folds to zero. Returns also the layout.
fn tcp_checksum_ok(frame: &[u8], ipv4: bool) -> (bool, TcpLayout) {
    let p = &frame[NET_HDR_LEN..];
    let gso = if ipv4 { GSO_TCPV4 } else { GSO_TCPV6 };
    let l = TcpLayout::parse(p, gso).unwrap();
    let addrs = if ipv4 {
        &p[l.l3 + 12..l.l3 + 20]
    } else {
        &p[l.l3 + 8..l.l3 + 40]
    };
    let pseudo = sum_words(0, addrs) + u64::from(IPPROTO_TCP) + (p.len() - l.l4) as u64;
    (fold(sum_words(pseudo, &p[l.l4..])) == 0, l)
}

#[test]
fn a_partial_checksum_is_completed_to_a_valid_one() {
    for (ipv4, vlan, payload) in [(true, false, 100), (false, true, 33), (true, true, 0)] {
        let mut f = tcp_frame(ipv4, vlan, payload, 0);
        assert!(!tcp_checksum_ok(&f, ipv4).0, "partial before");
        assert_eq!(Finish::of(&f, 0), Finish::Checksum);
        assert_eq!(Finish::of(&f, F_GUEST_CSUM), Finish::AsIs { flags: 1 });
        assert!(complete_checksum(&mut f));
        assert!(tcp_checksum_ok(&f, ipv4).0, "ipv4 {ipv4} vlan {vlan}");
        assert_eq!(
            NetHdr::read(&f),
            NetHdr {
                flags: 0,
                ..NetHdr::read(&f)
            }
        );
    }
    // Offsets beyond the frame: nothing changes.
    let mut f = tcp_frame(true, false, 10, 0);
    let before = f.clone();
    let hdr = NetHdr {
        csum_offset: 60_000,
        ..NetHdr::read(&f)
    };
    hdr.write(&mut f);
    let written = f.clone();
    assert!(!complete_checksum(&mut f));
    assert_eq!(f, written);
    assert_ne!(f, before);
}

#[test]
fn a_gso_frame_is_cut_into_mss_segments_with_fixed_headers() {
    for (ipv4, vlan) in [(true, false), (false, false), (true, true), (false, true)] {
        let mss = 1000;
        let f = tcp_frame(ipv4, vlan, 2500, mss);
        assert_eq!(check_tx(&mut f.clone(), ALL), Ok(()));
        assert_eq!(Finish::of(&f, F_GUEST_CSUM), Finish::Segment);
        let tso = if ipv4 { F_GUEST_TSO4 } else { F_GUEST_TSO6 };
        assert_eq!(
            Finish::of(&f, F_GUEST_CSUM | tso),
            Finish::AsIs { flags: 1 }
        );
        assert_eq!(Finish::of(&f, tso), Finish::Segment, "TSO needs GUEST_CSUM");
        let segs = Segments::new(&f, F_GUEST_CSUM).unwrap();
        assert_eq!(segs.count(), 3);
        let mut payload = Vec::new();
        let mut seg = Vec::new();
        for i in 0..3 {
            segs.build(i, &mut seg);
            let (ok, l) = tcp_checksum_ok(&seg, ipv4);
            assert!(ok, "segment {i} checksum (ipv4 {ipv4})");
            let p = &seg[NET_HDR_LEN..];
            let want = [1000, 1000, 500][i];
            assert_eq!(p.len() - l.payload, want);
            assert_eq!(
                NetHdr::read(&seg),
                NetHdr {
                    flags: HDR_F_DATA_VALID,
                    ..Default::default()
                }
            );
            if ipv4 {
                assert_eq!(be16(p, l.l3 + 2) as usize, p.len() - l.l3, "total length");
                assert_eq!(be16(p, l.l3 + 4), 0x1234 + i as u16, "id");
                assert_eq!(
                    fold(sum_words(0, &p[l.l3..l.l4])),
                    0,
                    "IPv4 header checksum"
                );
            } else {
                assert_eq!(be16(p, l.l3 + 4) as usize, p.len() - l.l4, "payload length");
            }
            let seq = u32::from_be_bytes(p[l.l4 + 4..l.l4 + 8].try_into().unwrap());
            assert_eq!(seq, 0xffff_fff0u32.wrapping_add(1000 * i as u32));
            let flags = p[l.l4 + 13];
            assert_eq!(
                flags & (TCP_FIN | TCP_PSH) != 0,
                i == 2,
                "FIN/PSH on the last only"
            );
            assert_eq!(flags & TCP_CWR != 0, i == 0, "CWR on the first only");
            assert_eq!(flags & 0x10, 0x10, "ACK kept");
            payload.extend_from_slice(&p[l.payload..]);
        }
        assert_eq!(payload, f[f.len() - 2500..]);
        // Without GUEST_CSUM the segments say nothing.
        Segments::new(&f, 0).unwrap().build(0, &mut seg);
        assert_eq!(seg[0], 0);
    }
}

#[test]
fn every_hostile_header_is_refused() {
    let good = tcp_frame(true, false, 3000, 1448);
    let mut ok = good.clone();
    assert_eq!(check_tx(&mut ok, ALL), Ok(()));
    let with = |change: &dyn Fn(&mut NetHdr)| {
        let mut f = good.clone();
        let mut h = NetHdr::read(&f);
        change(&mut h);
        h.write(&mut f);
        f
    };
    let len = good.len() - NET_HDR_LEN;
    let cases: [(Vec<u8>, u64, HdrError); 11] = [
        (with(&|h| h.flags |= 4), ALL, HdrError::Flags(5)),
        (good.clone(), ALL & !F_CSUM, HdrError::CsumNotAccepted),
        (
            with(&|h| h.csum_start = len as u16 - 1),
            ALL,
            HdrError::CsumBeyondFrame {
                start: len as u16 - 1,
                offset: 16,
                len,
            },
        ),
        (
            with(&|h| h.csum_offset = u16::MAX),
            ALL,
            HdrError::CsumBeyondFrame {
                start: 34,
                offset: u16::MAX,
                len,
            },
        ),
        (with(&|h| h.gso_type = 3), ALL, HdrError::GsoType(3)),
        (with(&|h| h.gso_type = 0x81), ALL, HdrError::GsoType(0x81)),
        (
            good.clone(),
            ALL & !F_HOST_TSO4,
            HdrError::GsoNotAccepted(1),
        ),
        (with(&|h| h.gso_size = 0), ALL, HdrError::GsoSizeZero),
        (with(&|h| h.flags = 0), ALL, HdrError::GsoWithoutCsum),
        (
            with(&|h| h.hdr_len = len as u16 + 1),
            ALL,
            HdrError::HdrLenBeyondFrame {
                hdr_len: len as u16 + 1,
                len,
            },
        ),
        (with(&|h| h.gso_type = GSO_TCPV6), ALL, HdrError::GsoHeaders),
    ];
    for (i, (mut f, acked, want)) in cases.into_iter().enumerate() {
        assert_eq!(check_tx(&mut f, acked), Err(want), "case {i}");
    }
    // TCP headers cut short, not TCP, or a checksum elsewhere than TCP's.
    let short = good[..NET_HDR_LEN + 14 + 20 + 10].to_vec();
    let mut h = NetHdr::read(&short);
    h.hdr_len = 0;
    h.csum_offset = 0;
    let mut short = short;
    h.write(&mut short);
    assert_eq!(check_tx(&mut short, ALL), Err(HdrError::GsoHeaders));
    let mut udp = good.clone();
    udp[NET_HDR_LEN + 14 + 9] = 17;
    assert_eq!(check_tx(&mut udp, ALL), Err(HdrError::GsoHeaders));
    let mut elsewhere = with(&|h| h.csum_offset = 6);
    assert_eq!(check_tx(&mut elsewhere, ALL), Err(HdrError::GsoHeaders));
    let mut fragment = good.clone();
    fragment[NET_HDR_LEN + 14 + 6] = 0x20; // more fragments
    assert_eq!(check_tx(&mut fragment, ALL), Err(HdrError::GsoHeaders));
    // DATA_VALID from the driver is dropped; a plain frame passes with nothing accepted.
    let mut plain = vec![0; NET_HDR_LEN];
    plain[0] = HDR_F_DATA_VALID;
    plain.extend_from_slice(&[0xff; 60]);
    assert_eq!(check_tx(&mut plain, 0), Ok(()));
    assert_eq!(plain[0], 0);
    // gso_size without a GSO type is ignored.
    let mut f = tcp_frame(true, false, 10, 0);
    f[4] = 9;
    assert_eq!(check_tx(&mut f, F_CSUM), Ok(()));
}

#[test]
fn frames_that_cannot_be_cut_are_recognised() {
    let f = tcp_frame(true, false, 10, 0);
    assert!(Segments::new(&f, 0).is_none(), "not GSO");
    let mut f = tcp_frame(true, false, 0, 500);
    let segs = Segments::new(&f, 0).unwrap();
    assert_eq!(segs.count(), 1, "no payload: one segment");
    let mut seg = Vec::new();
    segs.build(0, &mut seg);
    assert!(tcp_checksum_ok(&seg, true).0);
    f[1] = 0x42;
    assert_eq!(Finish::of(&f, ALL), Finish::Segment);
    assert!(Segments::new(&f, ALL).is_none(), "unknown GSO type");
}

#[test]
fn the_switch_hands_each_port_what_its_driver_takes() {
    use crate::{NetBackend, Switch};
    let sw = Switch::new("offload");
    let (a, plain, csum, tso) = (
        sw.port().unwrap(),
        sw.port().unwrap(),
        sw.port().unwrap(),
        sw.port().unwrap(),
    );
    csum.set_guest_features(F_GUEST_CSUM);
    tso.set_guest_features(F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6);
    let mut broadcast = tcp_frame(true, false, 3000, 1448);
    broadcast[NET_HDR_LEN..NET_HDR_LEN + 6].fill(0xff);
    a.transmit(&broadcast);
    let mut got = Vec::new();
    // The TSO port gets the GSO frame as it is.
    assert!(tso.receive(0, &mut got));
    assert_eq!(got, broadcast);
    assert!(!tso.receive(0, &mut got));
    // The others get 3 segments, DATA_VALID for the one with GUEST_CSUM.
    for (port, flags) in [(&plain, 0), (&csum, HDR_F_DATA_VALID)] {
        let mut payload = 0;
        for _ in 0..3 {
            assert!(port.receive(0, &mut got));
            assert_eq!(got[0], flags);
            assert!(tcp_checksum_ok(&got, true).0);
            payload += got.len() - NET_HDR_LEN - 14 - 20 - 32;
        }
        assert_eq!(payload, 3000);
        assert!(!port.receive(0, &mut got));
        assert_eq!(port.stats().snapshot().rx_segmented, 1);
    }
    // A partial checksum: completed for the port without GUEST_CSUM only.
    let mut partial = tcp_frame(false, false, 500, 0);
    partial[NET_HDR_LEN..NET_HDR_LEN + 6].fill(0xff);
    a.transmit(&partial);
    assert!(plain.receive(0, &mut got));
    assert!(got[0] == 0 && tcp_checksum_ok(&got, false).0);
    assert!(csum.receive(0, &mut got));
    assert_eq!(got, partial);
    // A GSO frame that cannot be cut (as a tap could hand one): dropped and counted.
    let mut udp = broadcast.clone();
    udp[1] = 3;
    a.transmit(&udp);
    assert!(!plain.receive(0, &mut got));
    assert_eq!(plain.stats().snapshot().rx_offload_dropped, 1);
}
