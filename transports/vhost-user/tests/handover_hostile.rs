//! Handover corner cases: an export asked for while a message is half received waits for
//! it; an import of a state that does not fit (missing or reused descriptors, regions outside
//! their files, rings outside memory, features the device does not offer, ...) is refused
//! with an error and leaves both devices as they were; the in-flight region goes along.
//! The frontend is the testkit's hand-written one, or raw bytes on the socket.

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use vhost::vhost_user::VhostUserFrontend;
use virtiod_testkit::frontend::{memfd, Driver, Options};
use virtiod_vhost_user::{ConnectionState, Export, HandoverError, HandoverState, VhostUserDevice};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const TIMEOUT: Duration = Duration::from_secs(10);
/// `VHOST_USER_GET_FEATURES`, `VHOST_USER_SET_MEM_TABLE`.
const GET_FEATURES: u32 = 1;
const SET_MEM_TABLE: u32 = 5;

fn header(request: u32, size: u32) -> Vec<u8> {
    [
        request.to_le_bytes(),
        1u32.to_le_bytes(),
        size.to_le_bytes(),
    ]
    .concat()
}

fn dups(export: &Export) -> Vec<OwnedFd> {
    export
        .fds()
        .iter()
        .map(|f| f.try_clone().unwrap())
        .collect()
}

#[test]
fn an_export_waits_for_a_memory_table_half_received() {
    let dir = Scratch::new("half");
    let img = dir.image("disk.img", 4 * MIB);
    let sock = dir.path("vu.sock");
    let a = serve(&img, &sock, "vu-a");
    let mut raw = UnixStream::connect(&sock).unwrap();
    // SET_MEM_TABLE with one region of 1 MiB: the header and 10 of its 40 payload bytes.
    let mut payload = Vec::new();
    payload.extend_from_slice(&1u32.to_le_bytes());
    payload.extend_from_slice(&0u32.to_le_bytes());
    for v in [0x10_0000u64, MIB, 0x7f00_0000_0000, 0] {
        payload.extend_from_slice(&v.to_le_bytes());
    }
    raw.write_all(&header(SET_MEM_TABLE, payload.len() as u32))
        .unwrap();
    raw.write_all(&payload[..10]).unwrap();
    // Once accepted, the device reads the first part and waits for the rest. (A connection
    // still in the listening socket's backlog would simply go along with the listener.)
    let deadline = std::time::Instant::now() + TIMEOUT;
    while a.device().connections_accepted() == 0 {
        assert!(std::time::Instant::now() < deadline, "never accepted");
        std::thread::sleep(Duration::from_millis(1));
    }
    let refused = a.device().export(Duration::from_millis(300));
    assert!(
        matches!(refused, Err(HandoverError::Timeout(_))),
        "no export mid-message: {:?}",
        refused.err()
    );
    // The rest, with the region's file: the message is handled, then the export goes.
    let region = memfd(MIB);
    let sent = raw
        .send_with_fds(&[&payload[10..]], &[region.as_raw_fd()])
        .unwrap();
    assert_eq!(sent, 30);
    let mut export = a.device().export(TIMEOUT).expect("export");
    let conn = export.state().connection.clone().expect("connected");
    assert_eq!(conn.regions.len(), 1, "the whole table is exported");
    assert_eq!(
        (conn.regions[0].guest_addr, conn.regions[0].size),
        (0x10_0000, MIB)
    );
    // A message sent while the connection is frozen waits in the socket for the next device.
    raw.write_all(&header(GET_FEATURES, 0)).unwrap();
    let b = device(&img);
    let fds = export.take_fds();
    let imported = b.import(export.state(), fds).expect("import");
    export.commit(TIMEOUT).unwrap();
    let b_server = b
        .spawn_imported(imported, &sock, "vu-b", |r| panic!("serving ended: {r:?}"))
        .unwrap();
    a.stop(TIMEOUT).unwrap();
    let mut reply = [0u8; 20];
    raw.read_exact(&mut reply).unwrap();
    assert_eq!(
        u32::from_le_bytes(reply[..4].try_into().unwrap()),
        GET_FEATURES
    );
    assert_eq!(u32::from_le_bytes(reply[8..12].try_into().unwrap()), 8);
    assert_ne!(u64::from_le_bytes(reply[12..].try_into().unwrap()), 0);
    // And the connection goes on with the second device.
    raw.write_all(&header(GET_FEATURES, 0)).unwrap();
    raw.read_exact(&mut reply).unwrap();
    assert_eq!(
        u32::from_le_bytes(reply[..4].try_into().unwrap()),
        GET_FEATURES
    );
    assert_eq!(b_server.device().connections_accepted(), 0);
    drop(raw);
    b_server.stop(TIMEOUT).unwrap();
}

/// Import `state` into `b` with duplicates of `export`'s descriptors; must fail.
fn refused(
    b: &std::sync::Arc<VhostUserDevice>,
    export: &Export,
    state: HandoverState,
) -> HandoverError {
    match b.import(&state, dups(export)) {
        Ok(_) => panic!("imported a state that does not fit: {state:?}"),
        Err(err) => err,
    }
}

/// Whether an import error is the one a case expects.
type Expected = fn(&HandoverError) -> bool;

fn c(s: &mut HandoverState) -> &mut ConnectionState {
    s.connection.as_mut().unwrap()
}

#[test]
fn an_import_that_does_not_fit_is_refused_and_both_devices_carry_on() {
    let dir = Scratch::new("unfit");
    let img = dir.image("disk.img", 4 * MIB);
    let sock = dir.path("vu.sock");
    let a = serve(&img, &sock, "vu-a");
    let mut d = Driver::connect_opts(&sock, &Options::queues(1).inflight(true));
    d.round_trip(8, &[0x5a; 4096]);
    let export = a.device().export(TIMEOUT).expect("export");
    let good = export.state().clone();
    let conn = good.connection.clone().unwrap();
    assert!(conn.inflight.is_some(), "the in-flight region is exported");
    assert_eq!(conn.regions.len(), 3);
    let r0 = conn.vrings[0].ring;
    assert!(r0.started && r0.enabled && r0.ready);
    assert_eq!(r0.next_avail, r0.next_used, "nothing in flight");
    assert!(!conn.vrings[1].ring.started, "queue 1 was never set up");
    let b = device(&img);
    let with = |f: &dyn Fn(&mut HandoverState)| {
        let mut s = good.clone();
        f(&mut s);
        s
    };
    let cases: Vec<(&str, HandoverState, Expected)> = vec![
        ("another version", with(&|s| s.version = 99), |e| {
            matches!(e, HandoverError::Version { .. })
        }),
        ("no listener", with(&|s| s.listener = 999), |e| {
            matches!(e, HandoverError::MissingFd { .. })
        }),
        ("no socket", with(&|s| c(s).socket = 999), |e| {
            matches!(e, HandoverError::MissingFd { .. })
        }),
        (
            "a region's fd is the socket's",
            with(&|s| {
                let sock = c(s).socket;
                c(s).regions[0].fd = sock
            }),
            |e| matches!(e, HandoverError::MissingFd { .. }),
        ),
        (
            "a region past its file",
            with(&|s| c(s).regions[1].size += 1 << 30),
            |e| matches!(e, HandoverError::Region { index: 1, .. }),
        ),
        (
            "a region at a huge offset",
            with(&|s| c(s).regions[0].mmap_offset = 1 << 40),
            |e| matches!(e, HandoverError::Region { index: 0, .. }),
        ),
        (
            "overlapping regions",
            with(&|s| c(s).regions[1].guest_addr = c(s).regions[0].guest_addr),
            |e| matches!(e, HandoverError::Region { .. }),
        ),
        (
            "a ring outside memory",
            with(&|s| c(s).vrings[0].ring.desc = 0x7000_0000_0000),
            |e| matches!(e, HandoverError::Mismatch(_)),
        ),
        (
            "a ring too large",
            with(&|s| c(s).vrings[0].ring.size = 1024),
            |e| matches!(e, HandoverError::Mismatch(_)),
        ),
        (
            "a queue the device lacks",
            with(&|s| c(s).vrings[1].index = 7),
            |e| matches!(e, HandoverError::Mismatch(_)),
        ),
        ("a ring twice", with(&|s| c(s).vrings[1].index = 0), |e| {
            matches!(e, HandoverError::Mismatch(_))
        }),
        (
            "a kick fd missing",
            with(&|s| c(s).vrings[0].kick = Some(999)),
            |e| matches!(e, HandoverError::MissingFd { .. }),
        ),
        (
            "features not offered",
            with(&|s| c(s).acked_features = Some(u64::MAX)),
            |e| matches!(e, HandoverError::Mismatch(_)),
        ),
        (
            "protocol features not offered",
            with(&|s| c(s).acked_protocol = Some(u64::MAX)),
            |e| matches!(e, HandoverError::Mismatch(_)),
        ),
        (
            "an in-flight region too small",
            with(&|s| c(s).inflight.as_mut().unwrap().mmap_size = 16),
            |e| matches!(e, HandoverError::Mismatch(_)),
        ),
        (
            "no in-flight fd",
            with(&|s| c(s).inflight.as_mut().unwrap().fd = 999),
            |e| matches!(e, HandoverError::MissingFd { .. }),
        ),
    ];
    for (case, state, expected) in cases {
        let err = refused(&b, &export, state);
        println!("{case}: {err}");
        assert!(expected(&err), "{case}: unexpected error {err:?}");
    }
    // A device serving a frontend takes nothing over.
    let err = refused(a.device(), &export, good.clone());
    assert!(matches!(err, HandoverError::Mismatch(_)), "{err:?}");
    // The second device is left clean: the real state imports (then it gives up).
    let imported = b
        .import(&good, dups(&export))
        .expect("the good state imports");
    drop(imported);
    export.resume();
    // The first device serves on as if nothing happened, on the same connection.
    d.round_trip(16, &[0xa5; 4096]);
    d.round_trip(8, &[0x3c; 512]);
    assert_eq!(a.device().connections_accepted(), 1);
}

#[test]
fn the_in_flight_region_goes_along_twice_and_the_last_device_accepts_later_frontends() {
    let dir = Scratch::new("inflight");
    let img = dir.image("disk.img", 4 * MIB);
    let sock = dir.path("vu.sock");
    let a = serve(&img, &sock, "vu-a");
    let mut d = Driver::connect_opts(&sock, &Options::queues(1).inflight(true));
    d.round_trip(0, &[1; 4096]);
    let mut export = a.device().export(TIMEOUT).expect("export");
    let b = device(&img);
    let fds = export.take_fds();
    let imported = b.import(export.state(), fds).expect("import");
    assert!(imported.has_connection());
    export.commit(TIMEOUT).unwrap();
    let b_server = b
        .spawn_imported(imported, &sock, "vu-b", |r| panic!("serving ended: {r:?}"))
        .unwrap();
    a.stop(TIMEOUT).unwrap();
    for i in 0..8u8 {
        d.round_trip(u64::from(i) * 8, &[i; 4096]);
    }
    // The negotiation went along too: messages are answered, acknowledged (REPLY_ACK).
    assert_eq!(d.capacity(), 4 * MIB / 512);
    d.fe.set_vring_enable(1, false)
        .expect("acknowledged by the new device");
    assert_eq!(b_server.device().connections_accepted(), 0);
    // And on to a third device: a connection taken over can be handed over again.
    let mut export = b_server.device().export(TIMEOUT).expect("second export");
    assert!(export
        .state()
        .connection
        .as_ref()
        .unwrap()
        .inflight
        .is_some());
    let c = device(&img);
    let fds = export.take_fds();
    let imported = c.import(export.state(), fds).expect("second import");
    export.commit(TIMEOUT).unwrap();
    let c_server = c
        .spawn_imported(imported, &sock, "vu-c", |r| panic!("serving ended: {r:?}"))
        .unwrap();
    b_server.stop(TIMEOUT).unwrap();
    for i in 0..4u8 {
        d.round_trip(u64::from(i) * 8 + 128, &[i ^ 0x55; 4096]);
    }
    let b_server = c_server;
    assert_eq!(b_server.device().connections_accepted(), 0);
    drop(d);
    let mut d = Driver::connect_opts(&sock, &Options::queues(1).inflight(true));
    d.round_trip(64, &[7; 4096]);
    assert_eq!(b_server.device().connections_accepted(), 1);
    drop(d);
    b_server.stop(TIMEOUT).unwrap();
}

#[test]
fn one_export_at_a_time_and_none_from_a_device_not_served() {
    let dir = Scratch::new("busy");
    let img = dir.image("disk.img", 4 * MIB);
    let dev = device(&img);
    std::thread::scope(|s| {
        let first = s.spawn(|| dev.export(Duration::from_millis(500)).err());
        std::thread::sleep(Duration::from_millis(100));
        assert!(matches!(dev.export(TIMEOUT), Err(HandoverError::Busy)));
        let first = first.join().unwrap();
        assert!(
            matches!(first, Some(HandoverError::Timeout(_))),
            "{first:?}"
        );
    });
    // The timed-out request was withdrawn: the next one times out again, it is not busy.
    assert!(matches!(
        dev.export(Duration::from_millis(50)),
        Err(HandoverError::Timeout(_))
    ));
}

/// Answer one backend request on `channel` (as QEMU does): returns its (request, flags).
fn answer_one(mut channel: UnixStream) -> std::thread::JoinHandle<(u32, u32)> {
    std::thread::spawn(move || {
        let mut hdr = [0u8; 12];
        channel.read_exact(&mut hdr).expect("a backend request");
        let word = |at: usize| u32::from_le_bytes(hdr[at..at + 4].try_into().unwrap());
        let (request, flags) = (word(0), word(4));
        if flags & 0x8 != 0 {
            let mut reply = header(request, 8);
            reply[4..8].copy_from_slice(&(0x1u32 | 0x4).to_le_bytes());
            reply.extend_from_slice(&0u64.to_le_bytes());
            channel.write_all(&reply).unwrap();
        }
        (request, flags)
    })
}

#[test]
fn the_backend_channel_goes_along_a_resize_after_the_handover_reaches_the_frontend() {
    let dir = Scratch::new("channel");
    let img = dir.image("disk.img", 4 * MIB);
    let sock = dir.path("vu.sock");
    let a = serve(&img, &sock, "vu-a");
    let mut d = Driver::connect_opts(&sock, &Options::default().backend_req(true));
    let (ours, theirs) = UnixStream::pair().unwrap();
    d.fe.set_backend_request_fd(&theirs)
        .expect("SET_BACKEND_REQ_FD");
    d.round_trip(0, &[9; 4096]);
    let mut export = a.device().export(TIMEOUT).expect("export");
    let conn = export.state().connection.clone().unwrap();
    assert!(
        conn.backend_channel.is_some(),
        "the backend channel is exported"
    );
    let blk_b = blk_device(&img);
    let b = VhostUserDevice::new(blk_b.clone(), Duration::ZERO).unwrap();
    let fds = export.take_fds();
    let imported = b.import(export.state(), fds).expect("import");
    export.commit(TIMEOUT).unwrap();
    let b_server = b
        .spawn_imported(imported, &sock, "vu-b", |r| panic!("serving ended: {r:?}"))
        .unwrap();
    a.stop(TIMEOUT).unwrap();
    let answered = answer_one(ours.try_clone().unwrap());
    let resized = blk_b.resize(8 * MIB, false).unwrap();
    assert_eq!(resized.notified, Ok(()), "the new device told the frontend");
    let (request, flags) = answered.join().unwrap();
    assert_eq!(request, 2, "VHOST_USER_BACKEND_CONFIG_CHANGE_MSG");
    assert_eq!(flags & 0x8, 0x8, "REPLY_ACK still applies to the channel");
    assert_eq!(d.capacity(), 8 * MIB / 512);
    d.round_trip(6 * MIB / 512, &[0x42; 4096]);
    drop(d);
    b_server.stop(TIMEOUT).unwrap();
}
