//! A hostile vhost-user frontend on the socket itself, against the real `virtiod` binary:
//! memory regions outside their file, memory shrunk after set-up, messages in pieces and
//! protocol features never offered. After each case the daemon is alive and a second,
//! well-behaved frontend writes a pattern and reads it back.

mod common;
mod ops_common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::frontend::*;
use common::{check_pattern, fill_pattern, Client, Daemon, Scratch};
use ops_common::RunDaemon;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const MIB: u64 = 1 << 20;

/// The daemon is alive and a new, well-behaved frontend gets back what it wrote.
fn still_serves(daemon: &mut Daemon, after: &str, seed: u8) {
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "daemon died after: {after}"
    );
    let mut d = Driver::connect(&daemon.socket);
    let data: Vec<u8> = (0..4096u32).map(|i| (i as u8) ^ seed).collect();
    d.round_trip(8 * u64::from(seed), &data);
    drop(d);
    assert!(daemon.child.try_wait().unwrap().is_none(), "daemon alive");
}

/// Wait until the daemon has closed `fe`'s connection (a request fails).
fn wait_closed(fe: &mut Frontend, case: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while fe.get_features().is_ok() {
        assert!(Instant::now() < deadline, "{case}: connection still open");
        sleep(Duration::from_millis(20));
    }
}

fn handshake(socket: &Path) -> Frontend {
    let fe = Frontend::connect(socket, 1).unwrap();
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    fe.set_features(features).unwrap();
    fe
}

#[test]
fn a_region_beyond_the_end_of_its_file_is_refused() {
    let dir = Scratch::new("sock-region");
    let mut daemon = Daemon::start(&dir.path("vu.sock"), "mem:16M", &[]);
    let mut fe = handshake(&daemon.socket);
    let proto = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(proto & VhostUserProtocolFeatures::MQ)
        .unwrap();
    let file = memfd(MIB);
    let va = 0x7f00_0000_0000u64;
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: MIB,
        userspace_addr: va,
        mmap_offset: 16 * MIB,
        mmap_handle: file.as_raw_fd(),
    };
    // Without REPLY_ACK nothing is answered: if the table is (wrongly) accepted, put a ring
    // in it and start it; the daemon then reads memory past the end of the file.
    let _ = fe.set_mem_table(&[region]);
    let ring = VringConfigData {
        queue_max_size: QSIZE,
        queue_size: QSIZE,
        flags: 0,
        desc_table_addr: va,
        used_ring_addr: va + 0x2000,
        avail_ring_addr: va + 0x1000,
        log_addr: None,
    };
    let (kick, call) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
    let _ = fe.set_vring_num(0, QSIZE);
    let _ = fe.set_vring_addr(0, &ring);
    let _ = fe.set_vring_base(0, 0);
    let _ = fe.set_vring_call(0, &call);
    let _ = fe.set_vring_kick(0, &kick);
    let _ = fe.set_vring_enable(0, true);
    let _ = kick.write(1);
    wait_closed(&mut fe, "region beyond its file");
    still_serves(&mut daemon, "a region beyond the end of its file", 1);
}

#[test]
fn memory_shrunk_after_set_up_disconnects_only_that_frontend() {
    let dir = Scratch::new("sock-shrink");
    let mut daemon = Daemon::start(&dir.path("vu.sock"), "mem:16M", &[]);
    let mut d = Driver::connect(&daemon.socket);
    d.round_trip(0, &[0x11; 4096]);
    // The rings live in region A: take it away and kick.
    d.shrink_region(A_BASE, 0);
    d.kick(0);
    wait_closed(&mut d.fe, "memory shrunk");
    drop(d);
    still_serves(&mut daemon, "memory shrunk after set-up", 2);
    // A second time, shrinking only part of a region (the buffers, not the rings).
    let mut d = Driver::connect(&daemon.socket);
    d.round_trip(0, &[0x22; 4096]);
    d.shrink_region(C_BASE, 4096);
    let h = d.readable(&header(T_IN, 0));
    let s = d.writable(1);
    d.write_table(Q0.desc, &linked(&[h, Desc::w(C_BASE + 8192, 512), s]));
    d.make_available(0, &[0]);
    wait_closed(&mut d.fe, "buffer memory shrunk");
    drop(d);
    still_serves(&mut daemon, "buffer memory shrunk", 3);
}

/// A raw vhost-user message: header (request, flags = version 1, size) and payload.
fn message(request: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = request.to_le_bytes().to_vec();
    m.extend_from_slice(&1u32.to_le_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    m.extend_from_slice(payload);
    m
}

/// Send `msg` in the pieces cut at `cuts`, the first with `fds`, pausing between pieces.
fn send_in_pieces(sock: &UnixStream, msg: &[u8], cuts: &[usize], fds: &[i32]) {
    let mut start = 0;
    for (i, &end) in cuts.iter().chain([msg.len()].iter()).enumerate() {
        let with = if i == 0 { fds } else { &[] };
        let sent = sock.send_with_fds(&[&msg[start..end]], with).unwrap();
        assert_eq!(sent, end - start);
        start = end;
        sleep(Duration::from_millis(50));
    }
}

/// Read one reply and return its payload as a u64.
fn reply_u64(sock: &mut UnixStream, request: u32) -> u64 {
    let mut buf = [0u8; 20];
    sock.read_exact(&mut buf).expect("a reply");
    assert_eq!(u32::from_le_bytes(buf[0..4].try_into().unwrap()), request);
    assert_eq!(u32::from_le_bytes(buf[8..12].try_into().unwrap()), 8);
    u64::from_le_bytes(buf[12..20].try_into().unwrap())
}

const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const SET_VRING_CALL: u32 = 13;
const GET_PROTOCOL_FEATURES: u32 = 15;

#[test]
fn a_message_in_three_pieces_is_served() {
    let dir = Scratch::new("sock-split");
    let mut daemon = Daemon::start(&dir.path("vu.sock"), "mem:16M", &[]);
    let mut sock = UnixStream::connect(&daemon.socket).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    sock.write_all(&message(SET_OWNER, &[])).unwrap();
    // A message without payload, its header in two pieces.
    send_in_pieces(&sock, &message(GET_FEATURES, &[]), &[5], &[]);
    let offered = reply_u64(&mut sock, GET_FEATURES);
    assert_ne!(
        offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        0
    );
    // Header in two pieces, the second with part of the payload, then the rest of it.
    let set = message(SET_FEATURES, &offered.to_le_bytes());
    send_in_pieces(&sock, &set, &[5, 15], &[]);
    // Only served if SET_FEATURES (with PROTOCOL_FEATURES) was taken whole.
    send_in_pieces(&sock, &message(GET_PROTOCOL_FEATURES, &[]), &[1, 7], &[]);
    let proto = reply_u64(&mut sock, GET_PROTOCOL_FEATURES);
    assert_ne!(proto & VhostUserProtocolFeatures::MQ.bits(), 0);
    // A message with a file descriptor sent along with the first piece: the descriptor
    // stays with its message (SET_VRING_CALL without one would be refused).
    let call = EventFd::new(0).unwrap();
    let set_call = message(SET_VRING_CALL, &0u64.to_le_bytes());
    send_in_pieces(&sock, &set_call, &[3, 14], &[call.as_raw_fd()]);
    send_in_pieces(&sock, &message(GET_FEATURES, &[]), &[11], &[]);
    assert_eq!(reply_u64(&mut sock, GET_FEATURES), offered, "still served");
    drop(sock);
    still_serves(&mut daemon, "messages in pieces", 4);
}

#[test]
fn protocol_features_never_offered_are_refused() {
    let dir = Scratch::new("sock-proto");
    let mut daemon = Daemon::start(&dir.path("vu.sock"), "mem:16M", &[]);
    let mut fe = handshake(&daemon.socket);
    let offered = fe.get_protocol_features().unwrap();
    let unknown = VhostUserProtocolFeatures::all() - offered;
    assert!(!unknown.is_empty());
    let _ = fe.set_protocol_features(offered | unknown);
    wait_closed(&mut fe, "unknown protocol features");
    still_serves(&mut daemon, "unknown protocol features", 5);
}

/// `virtiod run` with two devices: one frontend shrinks its memory and kicks while the
/// other device serves a verified write stream without an error.
#[test]
fn one_device_shrunk_under_run_the_other_keeps_serving() {
    let dir = Scratch::new("sock-run");
    let (a, b) = (dir.path("a.sock"), dir.path("b.sock"));
    let text = format!(
        "{}{}",
        ops_common::vhost_user_device("a", "mem:16M", &a),
        ops_common::vhost_user_device("b", "mem:16M", &b),
    );
    let cfg = dir.path("devices.toml");
    std::fs::write(&cfg, text).unwrap();
    let mut daemon = RunDaemon::start(&cfg, &[], &[a.clone(), b.clone()]);

    let done = Arc::new(AtomicBool::new(false));
    let until = done.clone();
    let stream = std::thread::spawn(move || {
        let mut client = Client::connect(&b, 1, 1 << 20).unwrap();
        let chunk = 64 << 10;
        // At least 100 verified writes, and on until the other device's rounds are over.
        let mut i = 0u64;
        while i < 100 || !until.load(Ordering::Acquire) {
            i += 1;
            let offset = (i % 128) * chunk as u64;
            fill_pattern(&mut client.buf()[..chunk], offset, i);
            assert_eq!(client.write(0, offset, 0, chunk), 0, "write {i}");
            client.buf()[..chunk].fill(0);
            assert_eq!(client.read(0, offset, 0, chunk), 0, "read {i}");
            check_pattern(&client.buf()[..chunk], offset, i).unwrap();
        }
        i
    });
    for round in 0..5u8 {
        let mut d = Driver::connect(&a);
        d.round_trip(0, &[round; 4096]);
        d.shrink_region(A_BASE, 0);
        d.kick(0);
        wait_closed(&mut d.fe, "memory shrunk under run");
        assert!(daemon.child.try_wait().unwrap().is_none(), "daemon alive");
    }
    done.store(true, Ordering::Release);
    let writes = stream.join().expect("device b served every request");
    assert!(writes >= 100);
    let mut d = Driver::connect(&a);
    d.round_trip(16, &[0x5A; 4096]);
    drop(d);
    let (status, _) = daemon.terminate();
    assert_eq!(status.code(), Some(0), "{status}");
}
